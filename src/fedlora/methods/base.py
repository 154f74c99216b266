"""The contract between an aggregation method and everything around it.

Plans and updates are plain dataclasses of tensors: exactly what crosses the wire, so the
communication counters read them instead of a formula. A method never trains, reads files,
prints or knows about transport (architecture.md §1–2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

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
    rank_patterns: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    """Per-layer ranks: a module-name suffix (e.g. ``mlp.down_proj``) → client → rank."""

    def rank_of(self, client: int, layer: str) -> int:
        """Client k's rank on one layer: the longest matching rank pattern, else its rank."""
        best = max((s for s in self.rank_patterns if layer == s or layer.endswith("." + s)), key=len, default=None)
        return self.rank_patterns[best][client] if best is not None else self.ranks[client]

    def layer_ranks(self, client: int) -> dict[str, int]:
        return {name: self.rank_of(client, name) for name in self.layers}


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
    rank_pattern: dict[str, int] = field(default_factory=dict)  # layers whose rank is not ``rank``
    init: dict[str, Factors] | None = None
    base_updates: list[Delta] = field(default_factory=list)
    base_version: int = 0
    fold: Delta = field(default_factory=dict)
    train_A: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # dense task head (classifier), FedAvg'd outside the method


@dataclass
class ClientUpdate:
    """What client k returns: its trained factors (PEFT convention), n_k, s_k and its loss."""

    client: int
    num_examples: int
    scale: float
    factors: dict[str, Factors]
    train_loss: float = float("nan")
    meta: dict[str, Any] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)


Regularizer = Callable[[dict[str, tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]
"""Extra training loss from the live LoRA parameters: layer → (B, A)."""


class Method(Protocol):
    """A heterogeneous-rank aggregation method; stateful like a Flower strategy.

    Optional client-side hooks (run on the client, in the simulator and on Flower alike):
    ``client_prepare(plan) -> plan`` expands what the wire carries compactly (e.g. a seed);
    ``client_regularizer(plan) -> Regularizer | None`` adds a training penalty;
    ``client_finish(plan, update) -> update`` post-processes before upload (e.g. pruning).
    A method whose aggregate is a weighted sum also folds replies in one at a time
    (``begin``/``fold``/``commit``, methods/folding.py), so the server need not hold them all.
    """

    name: str
    summary: str
    setup: Setup
    state_keys: tuple[str, ...]
    """Attribute paths of everything ``aggregate`` changes (checkpoint and resume, methods/state.py)."""

    def plan(self, client: int, round: int) -> ClientPlan: ...

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> None: ...

    def global_delta(self) -> Delta:
        """G_t − W_0 per adapted layer, as low-rank terms (evaluation, diagnostics, export)."""
        ...


def client_prepare(method: Method, plan: ClientPlan) -> ClientPlan:
    hook = getattr(method, "client_prepare", None)
    return hook(plan) if hook else plan


def client_regularizer(method: Method, plan: ClientPlan) -> Regularizer | None:
    hook = getattr(method, "client_regularizer", None)
    return hook(plan) if hook else None


def client_finish(method: Method, plan: ClientPlan, update: ClientUpdate) -> ClientUpdate:
    hook = getattr(method, "client_finish", None)
    return hook(plan, update) if hook else update


def plan_for_layers(setup: Setup, client: int) -> tuple[int, dict[str, int]]:
    """A client's default rank and the layers that differ from it (PEFT's rank_pattern)."""
    rank = setup.ranks[client]
    pattern = {n: r for n, r in setup.layer_ranks(client).items() if r != rank}
    return rank, pattern


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
    return tensors_nbytes([*ts, *plan.head.values()]) + _meta_nbytes(plan.meta)


def update_nbytes(update: ClientUpdate, send_A: bool = True) -> int:
    """Uplink bytes: the returned factors (A only when it trained) and any indices."""
    ts: list[torch.Tensor] = []
    for f in update.factors.values():
        ts += [f.B, f.A] if send_A else [f.B]
    return tensors_nbytes([*ts, *update.head.values()]) + _meta_nbytes(update.meta)


def _meta_nbytes(meta: Mapping[str, Any]) -> int:
    return sum(tensors_nbytes([v]) for v in meta.values() if isinstance(v, torch.Tensor))
