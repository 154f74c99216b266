"""methods.md §3 items 2, 3 (math side) and 11 for FLoRA, in float64."""

import itertools

import torch

from fedlora.methods import Setup, build_method
from fedlora.methods.base import plan_nbytes, update_nbytes
from fedlora.ops.lowrank import Dense, LowRank, fold_terms
from fedlora.ops.weights import data_weights
from fedlora.train.client import ClientState, start_delta

from tests.conftest import random_update, rel_err

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 10)}
RANKS = {0: 4, 1: 2, 2: 1}
SCALES = {0: 2.0, 1: 0.5, 2: 3.0}  # unequal s_k on purpose


def _flora(**options):
    return build_method("flora", Setup(LAYERS, RANKS, SCALES, seed=0, dtype=torch.float64, options=options))


def _round(method, gen, clients=(0, 1, 2), n=(10, 30, 60)):
    updates = [random_update(k, LAYERS, RANKS[k], SCALES[k], n[i], gen) for i, k in enumerate(clients)]
    weights = data_weights([u.num_examples for u in updates])
    method.aggregate(updates, weights, 1)
    return updates, weights


def test_stack_equals_weighted_sum_of_scaled_products(gen):
    layers = {"l0.q": (40, 30), "l0.v": (6, 10)}  # Σr_k = 7: low-rank on l0.q, dense (the smaller form) on l0.v
    m = build_method("flora", Setup(layers, RANKS, SCALES, seed=0, dtype=torch.float64))
    updates = [random_update(k, layers, RANKS[k], SCALES[k], n, gen) for k, n in zip(RANKS, (10, 30, 60))]
    weights = data_weights([u.num_examples for u in updates])
    m.aggregate(updates, weights, 1)
    (q,), (v,) = m.global_delta()["l0.q"], m.global_delta()["l0.v"]
    assert isinstance(q, LowRank) and q.B.shape == (40, 7) and q.A.shape == (7, 30)
    assert isinstance(v, Dense) and v.W.shape == (6, 10)  # 7 (6 + 10) numbers would exceed 6 · 10
    for name, merged in (("l0.q", q), ("l0.v", v)):
        ideal = sum(p * u.scale * u.factors[name].B @ u.factors[name].A for u, p in zip(updates, weights))
        assert rel_err(merged.dense(), ideal) < 1e-12


def test_client_order_does_not_matter(gen):
    updates = [random_update(k, LAYERS, RANKS[k], SCALES[k], 10 * (k + 1), gen) for k in RANKS]
    results = []
    for perm in itertools.permutations(updates):
        m = _flora()
        m.aggregate(list(perm), data_weights([u.num_examples for u in perm]), 1)
        results.append(m.global_delta()["l0.q"][0].dense())
    for r in results[1:]:
        assert rel_err(r, results[0]) < 1e-13


def test_uniform_weights_option(gen):
    m = _flora(weights="uniform")
    updates, _ = _round(m, gen)
    ideal = sum(u.scale * u.factors["l0.v"].B @ u.factors["l0.v"].A for u in updates) / 3
    assert rel_err(m.global_delta()["l0.v"][0].dense(), ideal) < 1e-12


def test_single_client_reduces_to_one_merged_lora(gen):
    m = build_method("flora", Setup(LAYERS, {0: 3}, {0: 2.0}, dtype=torch.float64))
    u = random_update(0, LAYERS, 3, 2.0, 5, gen)
    m.aggregate([u], [1.0], 1)
    for name in LAYERS:
        assert rel_err(m.global_delta()[name][0].dense(), 2.0 * u.factors[name].B @ u.factors[name].A) < 1e-14


def test_skipped_client_catches_up_to_the_same_base(gen):
    m = _flora()
    states = {k: ClientState() for k in RANKS}
    w0 = {n: torch.zeros(s, dtype=torch.float64) for n, s in LAYERS.items()}
    for rnd, sampled in enumerate([(0, 1), (0, 2), (0, 1)], start=1):
        plans = {k: m.plan(k, rnd) for k in sampled}
        for k in sampled:
            states[k].catch_up(plans[k])
        _round(m, gen, clients=sampled, n=(10, 20))
    # client 2 skipped rounds 1 and 3; client 1 skipped round 2; all must reach the same base
    bases = {}
    for k in RANKS:
        plan = m.plan(k, 4)
        states[k].catch_up(plan)
        bases[k] = {n: fold_terms(t, w0[n]) for n, t in start_delta(states[k], plan).items()}
    glob = {n: fold_terms(t, w0[n]) for n, t in m.global_delta().items()}
    for k in RANKS:
        for n in LAYERS:
            assert rel_err(bases[k][n], glob[n]) < 1e-13


def test_downlink_counts_missed_stacks_and_uplink_counts_factors(gen):
    layers = {"q": (40, 30), "v": (20, 30)}  # wide enough for every merge here to stay low-rank
    m = build_method("flora", Setup(layers, RANKS, SCALES, seed=0, dtype=torch.float64))
    d = sum(o + i for o, i in layers.values())

    def train(clients):
        ups = [random_update(k, layers, RANKS[k], SCALES[k], 10 * (k + 1), gen) for k in clients]
        m.aggregate(ups, data_weights([u.num_examples for u in ups]), 1)

    train((0, 1))  # round 1: stack rank 4+2
    plan = m.plan(2, 2)  # client 2 never trained: receives G_1 − W_0, the round-1 stack
    assert plan_nbytes(plan) == 8 * (4 + 2) * d and set(plan.base.reset) == set(layers)
    train((0, 2))  # round 2: stack rank 4+1
    plan = m.plan(0, 3)  # trained on the round-1 base: needs stack 2 only
    assert plan_nbytes(plan) == 8 * (4 + 1) * d and set(plan.base.merges) == set(layers) and (plan.base.since, plan.base.version) == (1, 2)
    assert plan_nbytes(m.plan(1, 3)) == 8 * (4 + 2 + 4 + 1) * d  # trained before stack 1 existed: G_2 − W_0, both stacks
    u = random_update(1, layers, 2, 0.5, 5, gen)
    assert update_nbytes(u) == 8 * 2 * d


def test_options_are_checked():
    import pytest

    from fedlora.methods import MethodError

    with pytest.raises(MethodError, match=r"^federation\.options\.weights: invalid value 'size' for flora \(accepted: data, uniform, capped\)$"):
        _flora(weights="size")
    with pytest.raises(MethodError, match=r"^federation\.options\.wieghts: unknown option for flora \(accepted: scaling, weight_cap, weights\)$"):
        _flora(wieghts="data")


def test_scaling_multiplies_the_merge_and_shows_in_agg_noise(gen):
    from fedlora.federation.diagnostics import agg_noise

    m1, m2 = _flora(), _flora(scaling=0.5)
    updates = [random_update(k, LAYERS, RANKS[k], SCALES[k], 10 * (k + 1), gen) for k in RANKS]
    w = data_weights([u.num_examples for u in updates])
    m1.aggregate(updates, w, 1)
    m2.aggregate(updates, w, 1)
    assert rel_err(m2.global_delta()["l0.q"][0].dense(), 0.5 * m1.global_delta()["l0.q"][0].dense()) < 1e-13
    starts = [{} for _ in updates]
    assert agg_noise({}, m1.global_delta(), starts, updates, w) < 1e-12
    assert abs(agg_noise({}, m2.global_delta(), starts, updates, w) - 0.5) < 1e-12


def test_a_stack_wider_than_the_layer_is_held_dense(gen):
    """Σr_k = 12 on a 5 × 7 layer: the merge is the 5 × 7 matrix itself, smaller than any factor pair of rank ≥ 3."""
    layers = {"w": (5, 7)}
    ranks = {k: 3 for k in range(4)}
    m = build_method("flora", Setup(layers, ranks, {k: 2.0 for k in ranks}, dtype=torch.float64))
    ups = [random_update(k, layers, 3, 2.0, 10 * (k + 1), gen) for k in ranks]
    p = data_weights([u.num_examples for u in ups])
    m.aggregate(ups, p, 1)
    (merged,) = m.global_delta()["w"]
    ideal = sum(pk * u.scale * u.factors["w"].B @ u.factors["w"].A for u, pk in zip(ups, p))
    assert isinstance(merged, Dense) and merged.W.shape == (5, 7)
    assert rel_err(merged.dense(), ideal) < 1e-13
