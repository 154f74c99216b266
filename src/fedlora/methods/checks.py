"""Setup checks shared by the methods that need one rank or one scale for every client."""

from __future__ import annotations

from fedlora.methods.base import Setup
from fedlora.methods.errors import MethodError
from fedlora.methods.registry import REGISTRY


def heterogeneous() -> str:
    """The registered methods that federate clients of different ranks (named in every one-rank error), read from their ``ranks``."""
    return ", ".join(name for name, cls in REGISTRY.items() if cls.ranks == "any" and cls.communicates)


def one_rank(method: str, setup: Setup) -> int:
    """The rank every client shares on every layer, or a one-line error naming the alternatives."""
    if setup.rank_patterns:
        raise MethodError(f"lora.rank_patterns: {method} needs one rank on every layer (accepted: none, or a heterogeneous method: {heterogeneous()})")
    ranks = sorted(set(setup.ranks.values()))
    if len(ranks) != 1:
        raise MethodError(
            f"federation.method: {method!r} needs one rank for every client, got lora.ranks={[setup.ranks[k] for k in sorted(setup.ranks)]} "
            f"(accepted: lora.rank=R, or a heterogeneous method: {heterogeneous()})"
        )
    return ranks[0]


def one_scale(method: str, setup: Setup) -> float:
    """The scale s every client shares (lora.scale), or a one-line error."""
    scales = sorted(set(setup.scales.values()))
    if len(scales) != 1:
        raise MethodError(f"federation.method: {method!r} needs one lora.scale for every client, got lora.scale={[setup.scales[k] for k in sorted(setup.scales)]} (accepted: one lora.scale)")
    return scales[0]


def start_one_rank(method, setup: Setup) -> dict:
    """The start of a one-rank method's ``__init__``: its options read, ``setup``, ``rank``, ``scale``, ``weighting`` set."""
    from fedlora.methods.options import read_options, weighting

    opts = read_options(method.name, method.options, setup.options)
    method.setup = setup
    method.rank, method.scale = one_rank(method.name, setup), one_scale(method.name, setup)
    method.weighting = weighting(method.name, opts)
    return opts
