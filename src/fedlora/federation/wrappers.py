"""Wrappers at the seam (federation/seam.py), built from ``federation.wrappers`` in the config.

Each entry is a mapping: ``use`` names the wrapper (a built-in below, or ``package.module:Class``
importable on the server), every other key is passed to its constructor. For example::

    federation:
      method: fedit
      wrappers: [{use: clip, max_norm: 0.5}]
"""

from __future__ import annotations

import importlib
from typing import Any

from fedlora.federation.seam import Contribution, Wrapper, WrapperError


class ClipEach(Wrapper):
    """Bounds each contribution's norm ‖T_k‖_2 (all its tensors together) by ``max_norm``: T_k · min(1, C / ‖T_k‖).

    The per-client step of client-level DP (the sensitivity the noise is calibrated to) and a guard against
    one client's outsized update. The round's metrics count the contributions it scaled down.
    """

    name = "clip"

    def __init__(self, max_norm: float) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0 or max_norm == float("inf"):
            raise WrapperError(f"federation.wrappers: clip max_norm {max_norm!r} (accepted: a finite number > 0)")
        self.max_norm = float(max_norm)
        self.clipped: list[int] = []

    def begin(self, round: int) -> None:
        self.clipped = []

    def contribution(self, c: Contribution, round: int) -> Contribution:
        norm = c.norm()
        if norm <= self.max_norm:
            return c
        self.clipped.append(c.client)
        factor = self.max_norm / norm
        return Contribution(c.client, c.weight, {k: t * factor for k, t in c.tensors.items()})

    def round_metrics(self) -> dict[str, Any]:
        return {"clipped": sorted(self.clipped)}


BUILT_IN: dict[str, type[Wrapper]] = {ClipEach.name: ClipEach}


def build_wrappers(specs: list[dict[str, Any]]) -> list[Wrapper]:
    """The config's ``federation.wrappers``, built in order (the first sees a contribution first)."""
    return [_build(spec) for spec in specs]


def _build(spec: dict[str, Any]) -> Wrapper:
    accepted = f"accepted: {{use: NAME, ...options}} with NAME one of {', '.join(BUILT_IN)} or package.module:Class"
    if not isinstance(spec, dict) or not isinstance(spec.get("use"), str):
        raise WrapperError(f"federation.wrappers: entry {spec!r} ({accepted})")
    use, options = spec["use"], {k: v for k, v in spec.items() if k != "use"}
    cls = BUILT_IN.get(use) or _import(use, accepted)
    try:
        return cls(**options)
    except TypeError as e:
        raise WrapperError(f"federation.wrappers: {use} options {options} do not fit it: {e} ({accepted})") from None


def _import(path: str, accepted: str) -> type[Wrapper]:
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise WrapperError(f"federation.wrappers: unknown wrapper {path!r} ({accepted})")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise WrapperError(f"federation.wrappers: {path!r} cannot be imported: {e} ({accepted})") from None
    if not (isinstance(obj, type) and issubclass(obj, Wrapper)):
        raise WrapperError(f"federation.wrappers: {path!r} is {obj!r}, not a wrapper class (accepted: a subclass of fedlora.federation.seam.Wrapper)")
    return obj
