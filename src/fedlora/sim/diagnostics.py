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
from fedlora.ops.lowrank import LowRank, frob_norm

Weighted = list[tuple[float, LowRank]]


def _combine(weighted: Weighted) -> list[tuple[float, LowRank]]:
    """Sum the coefficients of identical terms and drop those that cancel (no copies)."""
    coef: dict[tuple[int, int], float] = {}
    term: dict[tuple[int, int], LowRank] = {}
    for c, t in weighted:
        key = (id(t.B), id(t.A))
        coef[key] = coef.get(key, 0.0) + c
        term[key] = t
    return [(c, term[k]) for k, c in coef.items() if abs(c) > 1e-12]


def _layer_norm(weighted: Weighted) -> float:
    """‖Σ c_i B_i A_i‖_F in float64: low-rank while Σr is below min(d_out, d_in), else a dense sum.

    Above that rank (a round of many clients on a small layer) the dense d_out × d_in sum is the
    smaller object; it is accumulated one term at a time, so no stacked copy of every term exists.
    """
    terms = _combine(weighted)
    if not terms:
        return 0.0
    d_out, d_in = terms[0][1].B.shape[0], terms[0][1].A.shape[1]
    if sum(t.rank for _, t in terms) < min(d_out, d_in):
        return frob_norm([LowRank(t.B.to(torch.float64) * c, t.A.to(torch.float64)) for c, t in terms])
    dense = torch.zeros(d_out, d_in, dtype=torch.float64)
    for c, t in terms:
        dense.addmm_(t.B.to(torch.float64), t.A.to(torch.float64), alpha=c)
    return float(torch.linalg.matrix_norm(dense))


def _norm(per_layer: dict[str, Weighted]) -> float:
    """‖·‖_F over all adapted layers together."""
    return math.sqrt(sum(_layer_norm(w) ** 2 for w in per_layer.values()))


def _add(out: dict[str, Weighted], delta: Delta, c: float) -> None:
    for name, terms in delta.items():
        out.setdefault(name, []).extend((c, t) for t in terms)


def _trained(update: ClientUpdate) -> Delta:
    """B_k A_k per layer, the same tensors; the caller's coefficient carries s_k."""
    return {n: [LowRank(f.B, f.A)] for n, f in update.factors.items()}


def _initial(plan: ClientPlan) -> Delta:
    """B_init A_init per layer (nothing for a fresh adapter, whose B is 0); coefficient s_k."""
    return {n: [LowRank(f.B, f.A)] for n, f in (plan.init or {}).items()}


def ratio(num: float, den: float) -> float | None:
    """num/den; 0 when both vanish (a method that matches a zero target); None when undefined."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else None


def agg_noise(before: Delta, after: Delta, starts: Sequence[Delta], updates: Sequence[ClientUpdate], weights: Sequence[float]) -> float | None:
    """Relative distance of the new global model from the ideal FedAvg update (0 = exact)."""
    err: dict[str, Weighted] = {}
    ideal: dict[str, Weighted] = {}
    _add(err, after, 1.0)
    _add(ideal, before, -sum(weights))
    for start, u, p in zip(starts, updates, weights):
        trained = _trained(u)
        for target, sign in ((err, -1.0), (ideal, 1.0)):
            _add(target, start, sign * p)
            _add(target, trained, sign * p * u.scale)
    _add(err, before, sum(weights) - 1.0)  # zero when the weights sum to one
    return ratio(_norm(err), _norm(ideal))


def init_noise(before: Delta, start: Delta, plan: ClientPlan) -> float | None:
    """Relative distance of client k's model at step 0 from the global model G_t."""
    diff: dict[str, Weighted] = {}
    _add(diff, start, 1.0)
    _add(diff, _initial(plan), float(plan.scale))
    _add(diff, before, -1.0)
    ref: dict[str, Weighted] = {}
    _add(ref, before, 1.0)
    return ratio(_norm(diff), _norm(ref))


def mean_defined(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
