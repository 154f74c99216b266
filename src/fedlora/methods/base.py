"""The contract between an aggregation method and everything around it.

Plans and updates are plain dataclasses of tensors: exactly what crosses the wire, so the
communication counters read them instead of a formula. A method never trains, reads files,
prints or knows about transport (architecture.md §1–2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

import torch

from fedlora.ops.lowrank import LowRank

LayerShapes = Mapping[str, tuple[int, int]]
"""Adapted layer name (base-model module path) → (d_out, d_in)."""

Delta = dict[str, list[LowRank]]
"""Per layer, low-rank terms whose products sum to a weight delta."""


@dataclass
class Factors:
    """One client's LoRA on one layer, PEFT convention: B (d_out × r), A (r × d_in), no scale."""

    B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:
        assert self.B.shape[1] == self.A.shape[0], f"rank mismatch: B {tuple(self.B.shape)} A {tuple(self.A.shape)}"

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class Setup:
    """What a method is built for: the layers, each client's rank and scale s_k, a seed."""

    layers: LayerShapes
    ranks: Mapping[int, int]
    scales: Mapping[int, float]
    seed: int = 0
    dtype: torch.dtype = torch.float32
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ClientPlan:
    """What the server sends client k for one round.

    - ``base_updates``: weight deltas the client adds, in order, to its persistent frozen base
      (FLoRA's merged stacks it has not applied yet); after them its base is at ``base_version``.
    - ``fold``: deltas folded into the frozen weights for this round only (Fed-PLoRA).
    - ``init``: the adapter's starting factors, or None for a fresh PEFT init (B = 0).
    """

    client: int
    round: int
    rank: int
    scale: float
    init: dict[str, Factors] | None = None
    base_updates: list[Delta] = field(default_factory=list)
    base_version: int = 0
    fold: Delta = field(default_factory=dict)
    train_A: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """What client k returns: its trained factors (PEFT convention), n_k, s_k and its loss."""

    client: int
    num_examples: int
    scale: float
    factors: dict[str, Factors]
    train_loss: float = float("nan")
    meta: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    """A heterogeneous-rank aggregation method; stateful like a Flower strategy."""

    name: str
    summary: str

    def plan(self, client: int, round: int) -> ClientPlan: ...

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> None: ...

    def global_delta(self) -> Delta:
        """G_t − W_0 per adapted layer, as low-rank terms (evaluation, diagnostics, export)."""
        ...


def tensors_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def plan_nbytes(plan: ClientPlan) -> int:
    """Downlink bytes: every tensor in the plan."""
    ts: list[torch.Tensor] = []
    for f in (plan.init or {}).values():
        ts += [f.B, f.A]
    for delta in [*plan.base_updates, plan.fold]:
        for terms in delta.values():
            for t in terms:
                ts += [t.B, t.A]
    return tensors_nbytes(ts) + _meta_nbytes(plan.meta)


def update_nbytes(update: ClientUpdate, send_A: bool = True) -> int:
    """Uplink bytes: the returned factors (A only when it trained) and any indices."""
    ts: list[torch.Tensor] = []
    for f in update.factors.values():
        ts += [f.B, f.A] if send_A else [f.B]
    return tensors_nbytes(ts) + _meta_nbytes(update.meta)


def _meta_nbytes(meta: Mapping[str, Any]) -> int:
    return sum(tensors_nbytes([v]) for v in meta.values() if isinstance(v, torch.Tensor))
