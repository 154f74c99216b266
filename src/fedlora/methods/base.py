"""The contract between an aggregation method and everything around it.

Plans and updates are plain dataclasses of tensors: exactly what crosses the wire, so the
communication counters read them instead of a formula. A method never trains, reads files,
prints or knows about transport (architecture.md §1–2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

import torch

from fedlora.ops.lowrank import LowRank, Term, kaiming_A, seeded_generator

LayerShapes = Mapping[str, tuple[int, int]]
"""Adapted layer name (base-model module path) → (d_out, d_in)."""

Delta = dict[str, list[Term]]
"""Per layer, terms (low-rank pairs, or a dense matrix) that sum to a weight delta."""


Factors = LowRank
"""One client's LoRA on one layer, PEFT convention: B (d_out × r), A (r × d_in), no scale folded in.

The same type as every other low-rank pair: a scale is what the holder says it is."""


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
class BaseUpdate:
    """What brings a client's persistent frozen base from version ``since`` to ``version``.

    Per layer exactly one of: ``merges`` — the merges since+1..version, added in order; or
    ``reset`` — the whole W_version − W_0, replacing what the client held (methods.md §4).
    """

    since: int
    version: int
    merges: Delta = field(default_factory=dict)
    reset: Delta = field(default_factory=dict)


@dataclass
class ClientPlan:
    """What the server sends client k for one round.

    - ``base``: what brings the client's persistent frozen base up to the current version
      (merging methods: always, empty when it is there already; None: the method never merges).
    - ``fold``: deltas folded into the frozen weights for this round only (Fed-PLoRA).
    - ``init``: the adapter's starting factors, or None for a fresh PEFT init (B = 0).
    - ``train_A``/``train_B``: which factors train; a frozen one stays at its ``init``.
    - ``keep_B``: B trains but stays on the client (FedSA-LoRA); it never crosses a wire.

    ``upload`` follows: a factor goes up when it trained and is not kept. The receiver knows
    every other factor already (a frozen one is the plan's ``init``), see ``as_received``.
    """

    client: int
    round: int
    rank: int
    scale: float
    rank_pattern: dict[str, int] = field(default_factory=dict)  # layers whose rank is not ``rank``
    init: dict[str, Factors] | None = None
    base: BaseUpdate | None = None
    fold: Delta = field(default_factory=dict)
    train_A: bool = True
    train_B: bool = True
    keep_B: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # dense task head (classifier), FedAvg'd outside the method

    @property
    def upload(self) -> str:
        """The factors that travel up: "BA", "B", "A" (or "")."""
        return ("B" if self.train_B and not self.keep_B else "") + ("A" if self.train_A else "")


Kept = dict[str, torch.Tensor]
"""What a client keeps between rounds and never sends (FedSA-LoRA's B per layer): flat tensors by key."""


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


class Kind:
    """``Method.kind`` on the class and on an instance: "pooled", "personal" or "global"."""

    def __get__(self, obj: Any, cls: type) -> str:
        held: Any = obj if obj is not None else cls
        return "pooled" if held.pooled else "personal" if held.personal else "global"


def no_reference(method: Any, layer: str, factors: Any, scales: Any, weights: Any) -> torch.Tensor | None:
    raise NotImplementedError(f"method {method.name!r} brings no reference formula (methods/reference.py)")


class Method:
    """A heterogeneous-rank aggregation method; stateful like a Flower strategy.

    Every capability the round reads is declared here with its default; a method overrides what
    it has. Client-side hooks run on the client, in the simulator and on Flower alike:
    ``client_prepare`` expands what the wire carries compactly (e.g. a seed),
    ``client_regularizer`` adds a training penalty, ``client_finish`` post-processes before upload
    (e.g. pruning). A method whose aggregate is a weighted sum also folds replies in one at a time
    (``folds``; ``begin``/``fold``/``commit``, methods/folding.py), so the server need not hold them all; a
    ``sums_only`` method declares only its contributions and how its state follows from their means
    (methods/sums.py), and the round's seam (federation/seam.py) does the rest.
    """

    name: str
    summary: str
    options: dict = {}
    setup: Setup
    state_keys: tuple[str, ...] = ()
    """Attribute paths of everything ``aggregate`` changes (checkpoint and resume, methods/state.py)."""

    folds = False  # aggregates reply by reply (begin/fold/commit)
    pooled = False  # one client trains on every client's data (the centralized reference)
    personal = False  # no global model: each client is evaluated with ``client_delta``
    communicates = True  # False: nothing crosses a wire (references); byte counters stay 0
    min_upload_rank: int | None = None  # None: an upload has exactly the plan's rank; else it may shrink to this
    modules: int | None = None  # Fed-PLoRA: the number R of one-rank modules per layer, checked on upload
    merged: Any = None  # a MergedBase when the method merges each round into the frozen base (FLoRA, zero-padding)
    keeps = False  # the client keeps state between rounds (``client_keep``/``client_start``), never sent; clients evaluate

    # What everybody else reads (tests, compare, study, export, benches, docs) instead of probing
    # or keeping lists of names; tests/methods/test_declarations.py checks each against behaviour.
    ranks = "any"  # "one": every client trains one rank (other setups are a MethodError); "any": r_k per client
    scales = "any"  # "one": every client shares one lora.scale (other setups are a MethodError)
    exact = False  # a round's global model is the FedAvg ideal G_t + Σ p_k (M_k − G_t) (agg_noise 0), at the default options
    merges = False  # merges into every client's frozen base each round: ``merged`` is then its MergedBase
    sums_only = False  # the aggregate needs only Σ_k w_k T_k of uploads of one shape, never one client's upload (secure summation)
    kind = Kind()  # "global", "personal" or "pooled": read from ``personal`` and ``pooled``, not declared twice
    reference: Callable[..., torch.Tensor | None] = no_reference
    """(method, layer, factors, scales, weights) → the layer's G_1 − W_0 after one round from the start, in dense
    float64: the formula the contract tests hold the method to. Point it at one of ``methods/reference.py``
    (``reference = ideal``) or bring your own; every method must (a formula may return None: no one formula)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup

    def plan(self, client: int, round: int) -> ClientPlan:
        raise NotImplementedError

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> list[float]:
        """Fold the round's updates into the state; ``weights`` may be unnormalised (example counts).

        Returns each update's weight as applied, normalised to sum 1 (empty: the method averages nothing).
        """
        raise NotImplementedError

    def global_delta(self) -> Delta:
        """G_t − W_0 per adapted layer (evaluation, diagnostics, export)."""
        raise NotImplementedError

    def base_delta(self) -> Delta:
        """W_t − W_0: what every client's frozen base holds once its plan brought it up to date."""
        return self.merged.delta() if self.merged is not None else {}

    def adapter_delta(self) -> Delta:
        """G_t − W_t: what evaluation adds over the current base."""
        return {} if self.merged is not None else self.global_delta()

    def client_delta(self, client: int) -> Delta:
        """Client k's own model (personal methods)."""
        return self.global_delta()

    def client_prepare(self, plan: ClientPlan) -> ClientPlan:
        return plan

    def client_start(self, plan: ClientPlan, kept: Kept | None) -> ClientPlan:
        """Client side, after ``client_prepare``: the plan completed with what the client kept (None: nothing yet)."""
        return plan

    def client_keep(self, plan: ClientPlan, update: ClientUpdate) -> Kept | None:
        """Client side, after training: what the client stores for its next round (None: nothing)."""
        return None

    def client_model(self, plan: ClientPlan) -> Delta:
        """Client side (``keeps`` methods): the client's own model over the base, from its started plan."""
        return {n: [LowRank(f.B * plan.scale, f.A)] for n, f in (plan.init or {}).items()}

    def client_regularizer(self, plan: ClientPlan) -> Regularizer | None:
        return None

    def client_finish(self, plan: ClientPlan, update: ClientUpdate) -> ClientUpdate:
        return update

    def round_metrics(self, updates: list[ClientUpdate]) -> dict[str, Any]:
        """Method-specific numbers for the round's metrics entry (Fed-PLoRA: module similarity)."""
        return {}

    def after_load(self) -> None:
        """Drop caches derived from the state once a checkpoint is loaded."""


def client_prepare(method: Method, plan: ClientPlan) -> ClientPlan:
    return method.client_prepare(plan)


def client_regularizer(method: Method, plan: ClientPlan) -> Regularizer | None:
    return method.client_regularizer(plan)


def client_finish(method: Method, plan: ClientPlan, update: ClientUpdate) -> ClientUpdate:
    return method.client_finish(plan, update)


def fresh_factors(layers: LayerShapes, rank: int, seed: int, dtype: torch.dtype) -> dict[str, Factors]:
    """PEFT's fresh LoRA per layer: B = 0, A Kaiming-uniform from the run seed (the same on every process)."""
    gen = seeded_generator(seed, 0)
    return {name: Factors(B=torch.zeros(d_out, rank, dtype=dtype), A=kaiming_A(rank, d_in, gen, dtype)) for name, (d_out, d_in) in layers.items()}


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
    base = [plan.base.merges, plan.base.reset] if plan.base else []
    for delta in [*base, plan.fold]:
        for terms in delta.values():
            for t in terms:
                ts += t.tensors()
    return tensors_nbytes([*ts, *plan.head.values()]) + _meta_nbytes(plan.meta)


def update_nbytes(update: ClientUpdate, upload: str = "BA") -> int:
    """Uplink bytes: the factors that travel up (``ClientPlan.upload``) and any indices."""
    ts: list[torch.Tensor] = []
    for f in update.factors.values():
        ts += [t for which, t in zip("BA", f.tensors()) if which in upload]
    return tensors_nbytes([*ts, *update.head.values()]) + _meta_nbytes(update.meta)


def _meta_nbytes(meta: Mapping[str, Any]) -> int:
    return sum(tensors_nbytes([v]) for v in meta.values() if isinstance(v, torch.Tensor))


def as_received(update: ClientUpdate, plan: ClientPlan, layers: LayerShapes) -> ClientUpdate:
    """The update as the server holds it: only the uploaded factors are the client's.

    Both transports pass every reply through ``complete_factors``, so the server sees the same
    update in process and over Flower.
    """
    if plan.upload == "BA":
        return update
    sent = {n: {w: t for w, t in zip("BA", f.tensors()) if w in plan.upload} for n, f in update.factors.items()}
    return replace(update, factors=complete_factors(sent, plan, layers))


def complete_factors(sent: Mapping[str, Mapping[str, torch.Tensor]], plan: ClientPlan, layers: LayerShapes) -> dict[str, Factors]:
    """Per layer, the uploaded factors plus the ones that did not travel.

    A frozen factor is the plan's ``init`` (the receiver sent it, or knows its seed); a kept one
    (FedSA-LoRA's B) is zeros of its shape: a placeholder no method reads.
    """
    out = {}
    for name, got in sent.items():
        d_out, d_in = layers[name]
        r = plan.rank_pattern.get(name, plan.rank)
        dtype = next(iter(got.values())).dtype if got else torch.float32
        init = (plan.init or {}).get(name)
        B = got.get("B")
        if B is None:
            B = torch.zeros(d_out, r, dtype=dtype) if plan.keep_B or init is None else init.B.to(dtype)
        A = got.get("A")
        if A is None:
            if init is None:
                raise ValueError(f"layer {name}: A did not travel and the plan holds none")
            A = init.A.to(dtype)
        out[name] = Factors(B, A)
    return out
