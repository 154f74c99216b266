"""HETLoRA: heterogeneous-rank LoRA with rank self-pruning (Cho et al., NAACL Findings 2024).

The server keeps one global rank-R pair per layer, R = max_k r_k (per layer), never merged into
the base. Client k starts from its truncation (B_g[:, :r_k], A_g[:r_k, :]), trains with the
tail penalty λ Σ_layers ‖B[:, h:]‖_F ‖A[h:, :]‖_F, h = ⌊γ r⌋, and self-prunes: when that tail
norm fell during the round its rank becomes max(r_min, ⌊γ r⌋) and it uploads only the kept
components. Ranks never grow. The server zero-pads every update to R and averages the factors
with weights w_k ∝ ‖s_k B_k A_k‖_F (``weights: data``: p_k) (methods.md §1).

Scales: the server stores the global B with the scale folded in, B̃_g = Σ w_k pad(s_k B_k), so
the global update is B̃_g A_g and client k receives B̃_g[:, :r_k] / s_k. With one s for every
client (the config default) B̃_g = s·B_g and the global update is s·B_g A_g exactly as methods.md
writes it; with unequal s_k each client still starts from the truncated global function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Mapping

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Method, Regularizer, Setup
from fedlora.methods.reference import padded_means
from fedlora.methods.registry import register
from fedlora.methods.errors import MethodError
from fedlora.methods.options import Option, read_options
from fedlora.ops.lowrank import LowRank, frob_norm_gram, kaiming_A, padded_sum, seeded_generator, truncate
from fedlora.ops.weights import normalised


@dataclass(frozen=True)
class _Number(Option):
    """A numeric option that may exclude its lower bound or require an integer."""

    open_low: bool = False
    integer: bool = False

    def accepted(self) -> str:
        hi = "inf" if self.high is None else self.high
        return f"{'an integer' if self.integer else 'a number'} in {'(' if self.open_low else '['}{self.low}, {hi}]"

    def check(self, method: str, key: str, value: Any) -> Any:
        value = super().check(method, key, value)
        if (self.open_low and value == self.low) or (self.integer and value != int(value)):
            raise MethodError(f"federation.options.{key}: invalid value {value!r} for {method} (accepted: {self.accepted()})")
        return value


def head(rank: int, gamma: float) -> int:
    """⌊γ r⌋, with γ read as the decimal it was written as (0.29·100 is 29, not 28)."""
    return math.floor(Fraction(repr(float(gamma))) * rank)


def pruned_rank(rank: int, gamma: float, r_min: int) -> int:
    """The rank after one self-pruning step: max(r_min, ⌊γ r⌋), never above r."""
    return min(rank, max(r_min, head(rank, gamma)))


def tail_norm(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], gamma: float) -> torch.Tensor:
    """Σ_layers ‖B[:, h:]‖_F · ‖A[h:, :]‖_F, h = ⌊γ r⌋; differentiable in the live (B, A).

    B: (d_out × r), A: (r × d_in) per layer; an empty tail (h = r) contributes 0.
    """
    terms = []
    for B, A in pairs.values():
        h = head(A.shape[0], gamma)
        terms.append(torch.linalg.matrix_norm(B[:, h:]) * torch.linalg.matrix_norm(A[h:]))
    return torch.stack(terms).sum()


def _float64(factors: Mapping[str, Factors]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (f.B.double(), f.A.double()) for n, f in factors.items()}


@register
class HetLoRA(Method):
    name = "hetlora"
    summary = "Truncate a global rank-R LoRA to r_k, tail-regularise and self-prune, zero-pad and norm-weight the average."

    options = {
        "gamma": _Number(0.99, "γ: the tail starts at component ⌊γ r⌋; pruning keeps max(r_min, ⌊γ r⌋)", low=0.0, high=1.0, open_low=True),
        "reg": Option(0.01, "λ: weight of the tail penalty λ Σ ‖B_tail‖_F ‖A_tail‖_F", low=0.0),
        "r_min": _Number(1, "smallest rank a client may prune to", low=1, integer=True),
        "weights": Option("norm", "w_k ∝ ‖s_k B_k A_k‖_F (norm) or p_k from example counts (data)", choices=("norm", "data")),
    }

    state_keys = ("glob", "rank", "layer_ranks", "last_weights")
    exact = False  # the product of the padded means holds cross-client terms
    sums_only = False  # w_k ∝ ‖s_k B_k A_k‖_F and the pruned ranks are read from each client's own upload
    reference = padded_means

    def __init__(self, setup: Setup) -> None:
        opts = read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.gamma, self.reg, self.r_min = float(opts["gamma"]), float(opts["reg"]), int(opts["r_min"])
        self.by_norm = opts["weights"] == "norm"
        self.min_upload_rank = self.r_min  # self-pruning: an upload may have a lower rank than its plan, never a higher one
        smallest = min(setup.rank_of(k, n) for k in setup.ranks for n in setup.layers)
        if self.r_min > smallest:
            raise MethodError(
                f"federation.options.r_min: invalid value {opts['r_min']!r} for hetlora "
                f"(accepted: an integer in [1, {smallest}], the smallest client rank)"
            )
        if any(s <= 0 for s in setup.scales.values()):
            raise MethodError(f"lora.scale: hetlora needs every s_k > 0, got {sorted(setup.scales.values())}")
        self.R = {n: max(setup.rank_of(k, n) for k in setup.ranks) for n in setup.layers}
        gen = seeded_generator(setup.seed, 0)
        self.glob: dict[str, LowRank] = {  # (B̃_g, A_g): (d_out × R), (R × d_in); B̃_g carries the scale
            n: LowRank(torch.zeros(d_out, self.R[n], dtype=setup.dtype), kaiming_A(self.R[n], d_in, gen, setup.dtype))
            for n, (d_out, d_in) in setup.layers.items()
        }
        self.rank: dict[int, int] = dict(setup.ranks)  # each client's current default rank
        self.layer_ranks: dict[int, dict[str, int]] = {k: setup.layer_ranks(k) for k in setup.ranks}
        self.last_weights: list[float] = []

    def plan(self, client: int, round: int) -> ClientPlan:
        """The truncation (B̃_g[:, :r] / s_k, A_g[:r]) at the client's current ranks; γ, λ, r_min as config."""
        ranks, s = self.layer_ranks[client], self.setup.scales[client]
        init = {n: Factors(B=g.B[:, : ranks[n]] / s, A=g.A[: ranks[n]].clone()) for n, g in self.glob.items()}
        rank = self.rank[client]
        return ClientPlan(
            client=client, round=round, rank=rank, scale=s, init=init,
            rank_pattern={n: r for n, r in ranks.items() if r != rank},
            meta={"gamma": self.gamma, "reg": self.reg, "r_min": self.r_min},
        )

    def client_regularizer(self, plan: ClientPlan) -> Regularizer | None:
        """λ · tail_norm(live factors), or None when λ = 0."""
        lam, gamma = float(plan.meta["reg"]), float(plan.meta["gamma"])
        if lam == 0.0:
            return None
        return lambda live: lam * tail_norm(live, gamma)

    def client_finish(self, plan: ClientPlan, update: ClientUpdate) -> ClientUpdate:
        """Self-prune: if the tail norm fell from plan.init to the trained factors, keep max(r_min, ⌊γ r⌋)."""
        gamma, r_min = float(plan.meta["gamma"]), int(plan.meta["r_min"])
        assert plan.init is not None, "hetlora plans always carry the truncated global factors"
        fell = float(tail_norm(_float64(update.factors), gamma)) < float(tail_norm(_float64(plan.init), gamma))
        if not fell:
            return replace(update, meta={**update.meta, "rank": plan.rank})
        factors = {n: Factors(*truncate(f.B, f.A, pruned_rank(f.rank, gamma, r_min))) for n, f in update.factors.items()}
        return replace(update, factors=factors, meta={**update.meta, "rank": pruned_rank(plan.rank, gamma, r_min)})

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> list[float]:
        """B̃_g = Σ w_k pad(s_k B_k), A_g = Σ w_k pad(A_k) over the sampled clients; learn pruned ranks."""
        for u in updates:
            self._learn_ranks(u)
        w = self._weights(updates, weights)
        dt = self.setup.dtype
        new: dict[str, LowRank] = {}
        for n, R in self.R.items():
            fs = [u.factors[n] for u in updates]
            B = padded_sum([f.B for f in fs], [wk * u.scale for wk, u in zip(w, updates)], R, 1, dt)  # Σ w_k pad(s_k B_k): (d_out × R)
            new[n] = LowRank(B, padded_sum([f.A for f in fs], w, R, 0, dt))  # Σ w_k pad(A_k): (R × d_in)
        self.glob, self.last_weights = new, w
        return w

    def global_delta(self) -> Delta:
        """G_t − W_0 = B̃_g A_g per layer (= s·B_g A_g with one common scale)."""
        return {n: [LowRank(g.B, g.A)] for n, g in self.glob.items()}

    def _weights(self, updates: list[ClientUpdate], weights: list[float]) -> list[float]:
        """w_k ∝ ‖s_k B_k A_k‖_F over all layers (low-rank, never dense), 0 for a client with no example; p_k if every norm is 0.

        One client's single term cannot cancel, so the r × r Gram form is exact enough here (no QR).
        Squares overflow float64 once a norm passes ~1e154 (and underflow below ~1e-154), so every
        norm is held as m · 2**e (``_scaled_norm``): the factors are scaled by powers of two before
        squaring and the clients' norms are brought to the largest one's exponent before they are
        normalised. Powers of two scale exactly: in the ordinary range the weights agree with the
        plain ‖·‖ to round-off, scaling every upload by a power of two changes none of their bits,
        and far outside it (‖s B A‖ up to ~1e600 or down to ~1e-600) they stay finite and exact to round-off.
        """
        p = normalised(weights)
        if not self.by_norm:
            return p
        scaled = [(0.0, 0) if pk == 0 else _scaled_norm(u) for u, pk in zip(updates, p)]
        top = max((e for m, e in scaled if m > 0), default=None)
        if top is None:
            return p
        return normalised([math.ldexp(m, e - top) if m > 0 else 0.0 for m, e in scaled])

    def _learn_ranks(self, u: ClientUpdate) -> None:
        """Record a client's ranks from its upload's shapes; they may only shrink, never below r_min."""
        k = u.client
        for n, f in u.factors.items():
            if not self.r_min <= f.rank <= self.layer_ranks[k][n]:
                allowed = f"{self.r_min}..{self.layer_ranks[k][n]}"
                raise ValueError(f"hetlora: client {k} uploaded rank {f.rank} on {n}; allowed {allowed} (ranks never grow)")
        self.layer_ranks[k] = {n: f.rank for n, f in u.factors.items()}
        self.rank[k] = min(self.rank[k], int(u.meta.get("rank", self.rank[k])))


def _scaled_norm(u: ClientUpdate) -> tuple[float, int]:
    """‖s_k B_k A_k‖_F over all layers as (m, e) with the norm = m · 2**e; (0.0, 0) when it is 0.

    Per layer the factors are divided by the powers of two of their largest entries (exact), the
    Gram form is taken on those (entries ≤ 1: no overflow; the largest ones ≥ 1/2: no underflow of
    what matters), and the layers' norms are summed in squares at the largest layer's exponent.
    """
    layers = [_layer_norm(f.B, f.A) for f in u.factors.values()]
    layers = [(m, e) for m, e in layers if m > 0]
    if not layers or u.scale == 0:
        return 0.0, 0
    top = max(e for _, e in layers)
    total = math.sqrt(math.fsum(math.ldexp(m, e - top) ** 2 for m, e in layers))
    ms, es = math.frexp(abs(float(u.scale)))
    return total * ms, top + es


def _layer_norm(B: torch.Tensor, A: torch.Tensor) -> tuple[float, int]:
    """‖B A‖_F (d_out × r)(r × d_in) as (m, e), norm = m · 2**e, from the factors scaled by powers of two."""
    B, A = B.double(), A.double()
    if B.numel() == 0 or A.numel() == 0:
        return 0.0, 0
    b_max, a_max = float(B.abs().max()), float(A.abs().max())
    if b_max == 0 or a_max == 0:
        return 0.0, 0
    eb, ea = math.frexp(b_max)[1], math.frexp(a_max)[1]  # largest entries in [2**(e-1), 2**e)
    return frob_norm_gram([LowRank(_times_power_of_two(B, -eb), _times_power_of_two(A, -ea))]), eb + ea


def _times_power_of_two(x: torch.Tensor, e: int) -> torch.Tensor:
    """x · 2**e, exact, in two steps so that no factor 2**(e/2) over- or underflows itself (|e| ≤ 2100)."""
    half = e // 2
    return x * math.ldexp(1.0, half) * math.ldexp(1.0, e - half)
