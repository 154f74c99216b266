"""Per-round noise diagnostics, computed once for every method from plans, updates and states.

agg_noise  = ‖G_{t+1} − (G_t + Δ*_t)‖_F / ‖Δ*_t‖_F, Δ*_t = Σ p_k (M_k − G_t)
init_noise = ‖(client k's adapted weight at step 0) − G_t‖_F / ‖G_t − W_0‖_F
(methods.md §2). Everything is a sum of low-rank terms relative to W_0, evaluated in float64
without densifying; a term shared by several sums (FLoRA's merged stacks) is recognised by
identity so exact cancellation gives exactly zero.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta
from fedlora.ops.lowrank import LowRank, frob_norm

Weighted = list[tuple[float, LowRank]]


def _combine(weighted: Weighted) -> list[LowRank]:
    """Sum coefficients of identical terms, drop those that cancel, cast to float64."""
    coef: dict[tuple[int, int], float] = {}
    term: dict[tuple[int, int], LowRank] = {}
    for c, t in weighted:
        key = (id(t.B), id(t.A))
        coef[key] = coef.get(key, 0.0) + c
        term[key] = t
    return [
        LowRank(term[k].B.to(torch.float64) * c, term[k].A.to(torch.float64))
        for k, c in coef.items()
        if abs(c) > 1e-12
    ]


def _norm(per_layer: dict[str, Weighted]) -> float:
    """‖·‖_F over all adapted layers together."""
    return math.sqrt(sum(frob_norm(_combine(w)) ** 2 for w in per_layer.values()))


def _add(out: dict[str, Weighted], delta: Delta, c: float) -> None:
    for name, terms in delta.items():
        out.setdefault(name, []).extend((c, t) for t in terms)


def _trained(update: ClientUpdate) -> Delta:
    """s_k B_k A_k per layer."""
    return {n: [LowRank(f.B * update.scale, f.A)] for n, f in update.factors.items()}


def _initial(plan: ClientPlan) -> Delta:
    """s_k B_init A_init per layer (nothing for a fresh adapter, whose B is 0)."""
    return {n: [LowRank(f.B * plan.scale, f.A)] for n, f in (plan.init or {}).items()}


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
        for target, sign in ((err, -1.0), (ideal, 1.0)):
            _add(target, start, sign * p)
            _add(target, _trained(u), sign * p)
    _add(err, before, sum(weights) - 1.0)  # zero when the weights sum to one
    return ratio(_norm(err), _norm(ideal))


def init_noise(before: Delta, start: Delta, plan: ClientPlan) -> float | None:
    """Relative distance of client k's model at step 0 from the global model G_t."""
    diff: dict[str, Weighted] = {}
    _add(diff, start, 1.0)
    _add(diff, _initial(plan), 1.0)
    _add(diff, before, -1.0)
    ref: dict[str, Weighted] = {}
    _add(ref, before, 1.0)
    return ratio(_norm(diff), _norm(ref))


def mean_defined(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
