"""methods.md §3 item 15 for FLoRIST, in float64: with τ = 1 it is FLoRA's merge; the share of
‖·‖_F² it drops is ≤ 1 − τ and is what the round reports (agg_noise its square root); the rank-p
pair is the dense SVD's top p; a client downloads that one pair."""

import math

import pytest
import torch

from fedlora.federation.round import Arrival, bounds_of, finish_round, start_of
from fedlora.methods import Setup
from fedlora.methods.base import plan_nbytes
from fedlora.methods.flora import FLoRA
from fedlora.methods.florist import FLoRIST, energy_rank
from fedlora.ops.lowrank import LowRank

from tests.conftest import random_update, rel_err

LAYERS = {"l0.q": (30, 24), "l0.v": (18, 24)}
RANKS = {0: 6, 1: 4, 2: 2, 3: 2}
SCALES = {0: 2.0, 1: 1.0, 2: 2.0, 3: 3.0}


def _method(cls, **options):
    return cls(Setup(LAYERS, RANKS, SCALES, seed=0, dtype=torch.float64, options=options))


def _updates(gen):
    return [random_update(k, LAYERS, r, SCALES[k], 3 + 5 * k, gen) for k, r in RANKS.items()]


def _round(m, updates, rnd=1):
    arrivals = [Arrival(m.plan(u.client, rnd), m.plan(u.client, rnd), u, start_of(m, m.plan(u.client, rnd))) for u in updates]
    return finish_round(m, bounds_of(m, 1e9), rnd, m.name, [u.client for u in updates], 1, m.global_delta(), arrivals, lambda *a: None)


def _exact(updates):
    n = [u.num_examples for u in updates]
    return {name: sum(k / sum(n) * u.scale * u.factors[name].B @ u.factors[name].A for k, u in zip(n, updates)) for name in LAYERS}


def _dense(m):
    return {n: sum(t.dense() for t in ts) for n, ts in m.global_delta().items()}


def test_energy_one_is_floras_merge(gen):
    updates = _updates(gen)
    florist, flora = _method(FLoRIST, energy=1.0), _method(FLoRA)
    _round(florist, updates)
    _round(flora, updates)
    a, b = _dense(florist), _dense(flora)
    assert all(rel_err(a[n], b[n]) < 1e-12 for n in LAYERS)
    assert florist.last["dropped_energy"] < 1e-12


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_the_dropped_share_is_at_most_one_minus_tau_and_is_reported(gen, energy):
    updates = _updates(gen)
    m = _method(FLoRIST, energy=energy)
    entry = _round(m, updates)
    exact, got = _exact(updates), _dense(m)
    dropped = sum(float(torch.linalg.norm(exact[n] - got[n]) ** 2) for n in LAYERS) / sum(float(torch.linalg.norm(exact[n]) ** 2) for n in LAYERS)
    assert 0 < dropped <= 1 - energy + 1e-12
    assert entry["florist"]["dropped_energy"] == pytest.approx(dropped, rel=1e-9, abs=1e-15)
    assert entry["agg_noise"] == pytest.approx(math.sqrt(dropped), rel=1e-9)
    for n in LAYERS:  # the rank-p pair is the dense SVD's top p, p the smallest rank that holds τ
        u, sv, vh = torch.linalg.svd(exact[n], full_matrices=False)
        p = energy_rank(sv, energy)
        assert sum(sv[: p - 1] ** 2) < energy * sum(sv**2) <= sum(sv[:p] ** 2) * (1 + 1e-12)
        assert rel_err(got[n], (u[:, :p] * sv[:p]) @ vh[:p]) < 1e-10
    assert entry["florist"]["rank_max"] <= sum(RANKS.values())


def test_a_client_downloads_one_rank_p_pair(gen):
    m = _method(FLoRIST, energy=0.8)
    _round(m, _updates(gen))
    plan = m.plan(0, 2)
    terms = dict(plan.base.reset)  # base version 0 → 1: the reset is round 1's one merge
    assert plan.init is None and all(len(ts) == 1 and isinstance(ts[0], LowRank) for ts in terms.values())
    p = {n: ts[0].rank for n, ts in terms.items()}
    assert all(p[n] < sum(RANKS.values()) for n in LAYERS)
    assert plan_nbytes(plan) == 8 * sum(p[n] * (o + i) for n, (o, i) in LAYERS.items())
