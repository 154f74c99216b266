"""methods.md §3 items 6 and 11 for zero-padding, and its §2 diagnostics, in float64."""

import pytest
import torch

from fedlora.methods import MethodError, Setup
from fedlora.methods.base import plan_nbytes, update_nbytes
from fedlora.methods.fedit import FedIT
from fedlora.methods.zeropad import ZeroPad
from fedlora.ops.lowrank import fold_terms, pad
from fedlora.ops.weights import data_weights
from fedlora.federation.diagnostics import agg_noise, init_noise
from fedlora.train.client import ClientState, start_delta

from tests.conftest import random_update, rel_err

LAYERS = {"l0.q": (40, 30), "l0.v": (20, 30)}  # wide enough for every merge here to stay low-rank
RANKS = {0: 4, 1: 2, 2: 1}
SCALES = {0: 2.0, 1: 0.5, 2: 3.0}  # unequal s_k on purpose
D = sum(o + i for o, i in LAYERS.values())


def _zeropad(ranks=RANKS, scales=SCALES, **options) -> ZeroPad:
    return ZeroPad(Setup(LAYERS, ranks, scales, seed=0, dtype=torch.float64, options=options))


def _updates(gen, clients=(0, 1, 2), n=(10, 30, 60), ranks=RANKS, scales=SCALES):
    return [random_update(k, LAYERS, ranks[k], scales[k], n[i], gen) for i, k in enumerate(clients)]


def _aggregate(method, updates, rnd=1):
    weights = data_weights([u.num_examples for u in updates])
    method.aggregate(updates, weights, rnd)
    return weights


def _dense(delta, name):
    return fold_terms(delta.get(name, []), torch.zeros(LAYERS[name], dtype=torch.float64))


def test_padding_keeps_each_clients_product(gen):
    for u in _updates(gen):
        for name, f in u.factors.items():
            B_p, A_p = pad(f.B, f.A, 4)
            assert B_p.shape == (LAYERS[name][0], 4) and A_p.shape == (4, LAYERS[name][1])
            assert rel_err(B_p @ A_p, f.B @ f.A) < 1e-14
            assert torch.count_nonzero(B_p[:, f.rank :]) == 0 and torch.count_nonzero(A_p[f.rank :]) == 0


def test_merge_is_the_product_of_padded_means(gen):
    m = _zeropad()
    updates = _updates(gen)
    w = _aggregate(m, updates)
    for name, (d_out, d_in) in LAYERS.items():
        (merged,) = m.global_delta()[name]
        assert merged.B.shape == (d_out, 4) and merged.A.shape == (4, d_in)  # R = max r_k = 4
        B_bar = torch.zeros(d_out, 4, dtype=torch.float64)
        A_bar = torch.zeros(4, d_in, dtype=torch.float64)
        for u, p in zip(updates, w):
            r = u.factors[name].rank
            B_bar[:, :r] += p * u.scale * u.factors[name].B
            A_bar[:r] += p * u.factors[name].A
        assert rel_err(merged.B, B_bar) < 1e-14 and rel_err(merged.A, A_bar) < 1e-14
        # B̄Ā = Σ_j Σ_k p_j p_k s_j pad(B_j) pad(A_k): the mean of products plus cross-client terms
        padded = [pad(u.factors[name].B, u.factors[name].A, 4) for u in updates]
        expected = sum(
            pj * pk * uj.scale * Bj @ Ak for uj, pj, (Bj, _) in zip(updates, w, padded) for pk, (_, Ak) in zip(w, padded)
        )
        assert rel_err(merged.dense(), expected) < 1e-12
        ideal = sum(p * u.scale * u.factors[name].B @ u.factors[name].A for u, p in zip(updates, w))
        assert rel_err(merged.dense(), ideal) > 1e-2  # cross terms: not exact


def test_every_client_counts(gen):
    updates = _updates(gen)
    m1 = _zeropad()
    _aggregate(m1, updates)
    for k in range(3):
        changed = list(updates)
        changed[k] = random_update(updates[k].client, LAYERS, RANKS[updates[k].client], updates[k].scale, updates[k].num_examples, gen)
        m2 = _zeropad()
        _aggregate(m2, changed)
        assert rel_err(m2.global_delta()["l0.q"][0].dense(), m1.global_delta()["l0.q"][0].dense()) > 1e-3


def test_equal_ranks_and_scales_give_fedits_product(gen):
    ranks, scales = {k: 3 for k in range(3)}, {k: 1.5 for k in range(3)}
    setup = Setup(LAYERS, ranks, scales, dtype=torch.float64)
    updates = _updates(gen, ranks=ranks, scales=scales)
    zp, fedit = ZeroPad(setup), FedIT(setup)
    w = _aggregate(zp, updates)
    fedit.aggregate(updates, w, 1)
    for name in LAYERS:
        (g_fedit,) = fedit.global_delta()[name]
        assert rel_err(zp.global_delta()[name][0].dense(), g_fedit.dense()) < 1e-13


def test_single_client_is_exact(gen):
    m = _zeropad()
    (u,) = _updates(gen, clients=(1,), n=(5,))
    _aggregate(m, [u])
    for name in LAYERS:
        assert rel_err(m.global_delta()[name][0].dense(), 0.5 * u.factors[name].B @ u.factors[name].A) < 1e-14


def test_uniform_weights_option(gen):
    m = _zeropad(weights="uniform")
    updates = _updates(gen)
    _aggregate(m, updates)
    (merged,) = m.global_delta()["l0.v"]
    B_bar = sum(pad(u.scale * u.factors["l0.v"].B, u.factors["l0.v"].A, 4)[0] for u in updates) / 3
    assert rel_err(merged.B, B_bar) < 1e-14


def test_per_layer_ranks_pad_to_each_layers_max(gen):
    patterns = {"v": {0: 1, 1: 5, 2: 2}}
    m = ZeroPad(Setup(LAYERS, RANKS, SCALES, dtype=torch.float64, rank_patterns=patterns))
    assert m.max_rank == {"l0.q": 4, "l0.v": 5}
    plan = m.plan(0, 1)
    assert plan.rank == 4 and plan.rank_pattern == {"l0.v": 1}
    updates = []
    for k, n in zip(RANKS, (10, 20, 30)):
        u = random_update(k, {"l0.q": LAYERS["l0.q"]}, RANKS[k], SCALES[k], n, gen)
        u.factors.update(random_update(k, {"l0.v": LAYERS["l0.v"]}, patterns["v"][k], SCALES[k], n, gen).factors)
        updates.append(u)
    _aggregate(m, updates)
    assert m.global_delta()["l0.q"][0].rank == 4 and m.global_delta()["l0.v"][0].rank == 5
    assert plan_nbytes(m.plan(0, 2)) == 8 * (4 * sum(LAYERS["l0.q"]) + 5 * sum(LAYERS["l0.v"]))


def test_byte_counts_follow_the_table(gen):
    m = _zeropad()
    assert plan_nbytes(m.plan(0, 1)) == 0  # nothing merged yet: a fresh adapter on W_0
    _aggregate(m, _updates(gen, clients=(1, 2), n=(10, 30)), rnd=1)  # R stays the setup's max, 4
    assert plan_nbytes(m.plan(1, 2)) == 8 * 4 * D  # one missed merge, R(d_in + d_out)
    _aggregate(m, _updates(gen, clients=(0, 2), n=(10, 30)), rnd=2)
    assert plan_nbytes(m.plan(2, 3)) == 8 * 4 * D  # trained on merge 1's base: misses merge 2 only
    assert plan_nbytes(m.plan(0, 3)) == 8 * 4 * D  # likewise
    assert plan_nbytes(m.plan(1, 3)) == 8 * 2 * 4 * D  # trained before merge 1 existed: misses 1 and 2
    m.aggregate(_updates(gen, clients=(2,), n=(5,)), [1.0], 3)
    assert plan_nbytes(m.plan(1, 4)) == 8 * 3 * 4 * D  # misses merges 1, 2 and 3
    for k in RANKS:
        assert update_nbytes(random_update(k, LAYERS, RANKS[k], SCALES[k], 5, gen)) == 8 * RANKS[k] * D  # r_k(d_in + d_out)


def test_options_are_checked():
    with pytest.raises(MethodError, match=r"^federation\.options\.weights: invalid value 'size' for zeropad \(accepted: data, uniform, capped\)$"):
        _zeropad(weights="size")
    with pytest.raises(MethodError, match=r"^federation\.options\.wieghts: unknown option for zeropad \(accepted: weight_cap, weights\)$"):
        _zeropad(wieghts="data")


def _run_round(method, states, sampled, gen, rnd):
    """One simulated round (tests/sim/test_diagnostics.py's pattern); fresh adapters, so no init to add."""
    before = method.global_delta()
    plans = {k: method.plan(k, rnd) for k in sampled}
    starts, inits = [], []
    for k in sampled:
        assert plans[k].init is None and plans[k].train_A  # fresh LoRA on the merged base
        states[k].catch_up(plans[k])
        starts.append(start_delta(states[k], plans[k]))
        inits.append(init_noise(before, starts[-1], plans[k]))
    updates = [random_update(k, LAYERS, RANKS[k], SCALES[k], 10 + 7 * k, gen) for k in sampled]
    w = data_weights([u.num_examples for u in updates])
    method.aggregate(updates, w, rnd)
    return before, method.global_delta(), starts, updates, w, inits


def test_diagnostics_under_partial_participation(gen):
    m = _zeropad()
    states = {k: ClientState() for k in RANKS}
    for rnd, sampled in enumerate([(0, 1, 2), (0, 2), (1, 2)], start=1):
        before, after, starts, updates, w, inits = _run_round(m, states, sampled, gen, rnd)
        # every client starts on the merged base G_t: its B = 0 adapter changes nothing
        assert all(x is not None and x < 1e-12 for x in inits)
        for s in starts:
            for name in LAYERS:
                assert rel_err(_dense(s, name), _dense(before, name)) < 1e-13
        # heterogeneous ranks: cross-client terms, agg_noise > 0 and as defined in §2, densely
        got = agg_noise(before, after, starts, updates, w)
        err2 = ideal2 = 0.0
        for name in LAYERS:
            ideal = sum(p * u.scale * u.factors[name].B @ u.factors[name].A for u, p in zip(updates, w))
            err2 += float(torch.linalg.norm(_dense(after, name) - _dense(before, name) - ideal)) ** 2
            ideal2 += float(torch.linalg.norm(ideal)) ** 2
        assert got > 1e-2 and abs(got - (err2 / ideal2) ** 0.5) < 1e-10 * got
    # one client alone is aggregated exactly
    before, after, starts, updates, w, _ = _run_round(m, states, (1,), gen, 4)
    assert agg_noise(before, after, starts, updates, w) < 1e-12
