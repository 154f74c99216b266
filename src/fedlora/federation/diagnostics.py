"""Per-round noise diagnostics, computed once for every method from plans, updates and states.

agg_noise  = ‖G_{t+1} − (G_t + Δ*_t)‖_F / ‖Δ*_t‖_F, Δ*_t = Σ p_k (M_k − G_t)
init_noise = ‖(client k's adapted weight at step 0) − G_t‖_F / ‖G_t − W_0‖_F
(methods.md §2). Everything is a sum of low-rank terms relative to W_0, evaluated in float64
one layer at a time (densely only where that is the smaller form); a term shared by several
sums (FLoRA's merged stacks) is recognised by identity so exact cancellation gives exactly zero.
Scales ride in the coefficients, so no client's factors are copied.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta
from fedlora.ops.lowrank import LowRank, Term, accumulate, frob_norm

Weighted = list[tuple[float, Term]]


def _key(t: Term) -> tuple[int, ...]:
    return tuple(id(x) for x in t.tensors())


def _combine(weighted: Weighted) -> list[tuple[float, Term]]:
    """Sum the coefficients of identical terms and drop those that cancel (no copies)."""
    coef: dict[tuple[int, ...], float] = {}
    term: dict[tuple[int, ...], Term] = {}
    for c, t in weighted:
        key = _key(t)
        coef[key] = coef.get(key, 0.0) + c
        term[key] = t
    return [(c, term[k]) for k, c in coef.items() if abs(c) > 1e-12]


def _add_dense(dense: torch.Tensor, weighted: Weighted) -> None:
    """dense += Σ c_i B_i A_i, one float64 product at a time."""
    for c, t in weighted:
        accumulate(dense, t.to(torch.float64), alpha=c)


def _layer_norm(weighted: Weighted, dense: torch.Tensor | None = None) -> float:
    """‖dense + Σ c_i B_i A_i‖_F in float64: low-rank while Σr is below min(d_out, d_in), else dense.

    Above that rank (a round of many clients on a small layer) the dense d_out × d_in sum is the
    smaller object; it is accumulated one term at a time, so no stacked copy of every term exists.
    """
    terms = _combine(weighted)
    if not terms and dense is None:
        return 0.0
    if dense is None:
        d_out, d_in = terms[0][1].shape
        pairs = [(c, t) for c, t in terms if isinstance(t, LowRank)]
        if len(pairs) == len(terms) and sum(t.rank for _, t in pairs) < min(d_out, d_in):
            return frob_norm([LowRank(t.B.to(torch.float64) * c, t.A.to(torch.float64)) for c, t in pairs])
        dense = torch.zeros(d_out, d_in, dtype=torch.float64)
    else:
        dense = dense.clone()
    _add_dense(dense, terms)
    return float(torch.linalg.matrix_norm(dense))


def _norm(per_layer: dict[str, Weighted], dense: dict[str, torch.Tensor] | None = None) -> float:
    """‖·‖_F over all adapted layers together."""
    dense = dense or {}
    names = [*per_layer, *(n for n in dense if n not in per_layer)]  # a fixed order: the float sum must not depend on hashing
    return math.sqrt(sum(_layer_norm(per_layer.get(n, []), dense.get(n)) ** 2 for n in names))


def _add(out: dict[str, Weighted], delta: Delta, c: float) -> None:
    for name, terms in delta.items():
        out.setdefault(name, []).extend((c, t) for t in terms)


def _initial(plan: ClientPlan) -> Delta:
    """B_init A_init per layer (nothing for a fresh adapter, whose B is 0); coefficient s_k."""
    return {n: [LowRank(f.B, f.A)] for n, f in (plan.init or {}).items()}


def ratio(num: float, den: float) -> float | None:
    """num/den; 0 when both vanish (a method that matches a zero target); None when undefined."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else None


class IdealSum:
    """S = Σ_k w_k (M_k − W_0) per layer, folded in as replies arrive: the FedAvg ideal of agg_noise.

    w_k are unnormalised (example counts); p_k = w_k / Σ w. Terms the clients share with each
    other and with the global model (FLoRA's merged stacks) are kept by reference with summed
    coefficients, so exact cancellation stays exact; each client's own s_k B_k A_k is kept by
    reference until a layer's clients' ranks reach min(d_out, d_in), and from then on summed into
    a dense float64 matrix, so the server need not hold every upload to measure the round.
    """

    def __init__(self) -> None:
        self.shared: dict[str, dict[tuple[int, ...], tuple[float, Term]]] = {}
        self.fresh: dict[str, Weighted] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.total = 0.0

    def add(self, start: Delta, update: ClientUpdate, weight: float) -> None:
        self.total += weight
        for name, terms in start.items():
            layer = self.shared.setdefault(name, {})
            for t in terms:
                key = _key(t)
                layer[key] = (layer.get(key, (0.0, t))[0] + weight, t)
        for name, f in update.factors.items():
            fresh = self.fresh.setdefault(name, [])
            fresh.append((weight * update.scale, LowRank(f.B, f.A)))
            if name in self.dense or sum(t.rank for _, t in fresh) >= min(f.B.shape[0], f.A.shape[1]):
                _add_dense(self.dense.setdefault(name, torch.zeros(f.B.shape[0], f.A.shape[1], dtype=torch.float64)), fresh)
                fresh.clear()

    def _scaled(self, out: dict[str, Weighted], c: float) -> dict[str, torch.Tensor]:
        """Add c·S's low-rank part to ``out``; return c·S's dense part."""
        for name, layer in self.shared.items():
            out.setdefault(name, []).extend((c * w, t) for w, t in layer.values())
        for name, fresh in self.fresh.items():
            out.setdefault(name, []).extend((c * w, t) for w, t in fresh)
        return {name: d * c for name, d in self.dense.items()}

    def agg_noise(self, before: Delta, after: Delta) -> float | None:
        """‖G_{t+1} − (G_t + Δ*)‖_F / ‖Δ*‖_F with Δ* = S/Σw − (G_t − W_0)."""
        inv = 1.0 / self.total if self.total > 0 else 0.0
        err: dict[str, Weighted] = {}
        _add(err, after, 1.0)
        err_dense = self._scaled(err, -inv)
        ideal: dict[str, Weighted] = {}
        _add(ideal, before, -1.0)
        ideal_dense = self._scaled(ideal, inv)
        return ratio(_norm(err, err_dense), _norm(ideal, ideal_dense))


def agg_noise(before: Delta, after: Delta, starts: Sequence[Delta], updates: Sequence[ClientUpdate], weights: Sequence[float]) -> float | None:
    """Relative distance of the new global model from the ideal FedAvg update (0 = exact)."""
    ideal = IdealSum()
    for start, u, p in zip(starts, updates, weights):
        ideal.add(start, u, p)
    return ideal.agg_noise(before, after)


class Reference:
    """‖G_t − W_0‖_F, the denominator of every client's init_noise in a round: computed once, when first needed."""

    def __init__(self, before: Delta) -> None:
        self.before = before
        self._norm: float | None = None

    def norm(self) -> float:
        if self._norm is None:
            ref: dict[str, Weighted] = {}
            _add(ref, self.before, 1.0)
            self._norm = _norm(ref)
        return self._norm


def init_noise(before: Delta, start: Delta, plan: ClientPlan, reference: Reference | None = None) -> float | None:
    """Relative distance of client k's model at step 0 from the global model G_t."""
    diff: dict[str, Weighted] = {}
    _add(diff, start, 1.0)
    _add(diff, _initial(plan), float(plan.scale))
    _add(diff, before, -1.0)
    num = _norm(diff)
    if num == 0.0:  # the client starts exactly at G_t (FLoRA, Fed-PLoRA): no need for the reference norm
        return 0.0
    return ratio(num, (reference or Reference(before)).norm())


def mean_defined(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
