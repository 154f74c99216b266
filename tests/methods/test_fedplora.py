"""methods.md §3 items 9 (math side) and 11 for Fed-PLoRA, plus its diagnostics, in float64."""

import pytest
import torch

from tests.dense_reference import dense, dense_agg_noise

from fedlora.methods import MethodError, Setup
from fedlora.methods.base import plan_nbytes, update_nbytes
from fedlora.methods.fedit import FedIT
from fedlora.methods.fedplora import FedPLoRA
from fedlora.ops.weights import data_weights
from fedlora.federation.diagnostics import agg_noise, init_noise
from fedlora.train.client import ClientState, start_delta

from tests.conftest import random_update, rel_err

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 10)}
RANKS = {0: 4, 1: 2, 2: 1}
S = 2.0


def _fedplora(ranks=RANKS, scale=S, **options):
    return FedPLoRA(Setup(LAYERS, ranks, {k: scale for k in ranks}, seed=3, dtype=torch.float64, options=options))


def _randomize(m, gen):
    """A global adapter that is not the fresh init (B ≠ 0), so folding has something to fold."""
    for f in m.factors.values():
        f.B.copy_(torch.randn(f.B.shape, generator=gen, dtype=torch.float64))


def _dense(delta, name):
    return dense(delta, name, LAYERS)


def _trained(m, k, rnd, gen, n=10):
    """Plan → a client's trained factors (its initial ones plus a random step) → client_finish."""
    plan = m.plan(k, rnd)
    u = random_update(k, LAYERS, plan.rank, plan.scale, n, gen)
    for name, f in plan.init.items():
        u.factors[name].B.add_(f.B)
        u.factors[name].A.add_(f.A)
    return plan, m.client_finish(plan, u)


def test_splitting_a_rank_R_lora_into_modules_changes_nothing(gen):
    m = _fedplora()
    _randomize(m, gen)
    for name, f in m.factors.items():
        assert f.B.shape == (LAYERS[name][0], 4) and f.A.shape == (4, LAYERS[name][1])  # R = max r_k
        modules = sum(S * torch.outer(f.B[:, j], f.A[j]) for j in range(4))  # s Σ_j b_j a_jᵀ
        assert rel_err(_dense(m.global_delta(), name), modules) < 1e-14
        assert rel_err(modules, S * f.B @ f.A) < 1e-14


def test_round_zero_is_the_peft_init_for_all_modules():
    m = _fedplora(modules=6)
    for f in m.factors.values():
        assert f.rank == 6 and torch.count_nonzero(f.B) == 0 and torch.count_nonzero(f.A) == f.A.numel()
        assert float(f.A.abs().max()) <= 1 / 10**0.5  # Kaiming-uniform bound 1/√d_in
    assert all(torch.count_nonzero(_dense(m.global_delta(), n)) == 0 for n in LAYERS)


@pytest.mark.parametrize("selection", ["random", "first"])
def test_select_n_fold_starts_every_client_at_the_global_model(gen, selection):
    m = _fedplora(selection=selection, modules=5)
    _randomize(m, gen)
    for rnd in (1, 2, 3):
        for k, r in RANKS.items():
            plan = m.plan(k, rnd)
            K = plan.meta["indices"]
            assert plan.rank == r and plan.scale == S and K.dtype == torch.int64 and K.tolist() == sorted(set(K.tolist()))
            if selection == "first":
                assert K.tolist() == list(range(r))
            U = [j for j in range(5) if j not in K.tolist()]
            start = start_delta(ClientState(), plan)
            for name, f in m.factors.items():
                # the same K on every layer; init = the selected modules, fold = s · the others
                assert torch.equal(plan.init[name].B, f.B[:, K]) and torch.equal(plan.init[name].A, f.A[K])
                (folded,) = plan.fold[name]
                assert torch.equal(folded.A, f.A[U]) and rel_err(folded.B, S * f.B[:, U]) < 1e-15
                step0 = _dense(start, name) + S * plan.init[name].B @ plan.init[name].A
                assert rel_err(step0, _dense(m.global_delta(), name)) < 1e-13


def test_random_selection_is_seeded_redrawn_and_uniform():
    m = _fedplora(modules=5)
    assert torch.equal(m.indices(1, 7), m.indices(1, 7))
    assert torch.equal(m.indices(1, 7), _fedplora(modules=5).indices(1, 7))  # depends on (seed, round, client) only
    assert any(not torch.equal(m.indices(1, 7), m.indices(1, t)) for t in range(8, 14))  # re-drawn every round
    assert any(not torch.equal(m.indices(0, 7), m.indices(2, t)) for t in range(7, 9))
    counts = torch.zeros(5)
    draws = 2000
    for t in range(draws):
        counts[m.indices(1, t)] += 1
    assert float((counts / draws - 2 / 5).abs().max()) < 0.04  # each module picked with probability r_k/R


def test_full_rank_client_folds_nothing():
    m = _fedplora()
    plan = m.plan(0, 1)
    assert plan.meta["indices"].tolist() == [0, 1, 2, 3] and plan.fold == {}


def test_per_module_average_by_hand(gen):
    """selection first, R = 4: client 0 trains 0..3, client 1 trains 0..1, client 2 trains 0."""
    for weights in ("uniform", "data"):
        m = _fedplora(selection="first", weights=weights)
        _randomize(m, gen)
        ups = [_trained(m, k, 1, gen, n)[1] for k, n in zip(RANKS, (10, 30, 60))]
        p = data_weights([10, 30, 60])
        m.aggregate(ups, p, 1)
        w = [1.0, 1.0, 1.0] if weights == "uniform" else p
        for name, f in m.factors.items():
            B = [u.factors[name].B for u in ups]
            A = [u.factors[name].A for u in ups]
            for j, trainers in ((0, (0, 1, 2)), (1, (0, 1)), (2, (0,)), (3, (0,))):
                tot = sum(w[k] for k in trainers)
                assert rel_err(f.B[:, j], sum(w[k] * B[k][:, j] for k in trainers) / tot) < 1e-14
                assert rel_err(f.A[j], sum(w[k] * A[k][j] for k in trainers) / tot) < 1e-14
            assert torch.equal(f.B[:, 2:], B[0][:, 2:]) and torch.equal(f.A[2:], A[0][2:])  # one trainer: copied exactly
            assert rel_err(_dense(m.global_delta(), name), S * f.B @ f.A) < 1e-14


def test_untrained_modules_keep_their_values_bit_for_bit(gen):
    m = _fedplora(modules=7)
    _randomize(m, gen)
    before = {n: (f.B.clone(), f.A.clone()) for n, f in m.factors.items()}
    plans_ups = [_trained(m, k, 4, gen, 10 + k) for k in (1, 2)]  # at most 3 of 7 modules trained
    m.aggregate([u for _, u in plans_ups], data_weights([10, 11]), 4)
    trained = set().union(*(p.meta["indices"].tolist() for p, _ in plans_ups))
    untouched = [j for j in range(7) if j not in trained]
    assert len(untouched) >= 4
    for name, f in m.factors.items():
        B0, A0 = before[name]
        assert torch.equal(f.B[:, untouched], B0[:, untouched]) and torch.equal(f.A[untouched], A0[untouched])
        assert all(not torch.equal(f.B[:, j], B0[:, j]) for j in trained)


def test_single_trainer_is_copied_exactly_under_data_weights(gen):
    m = _fedplora(ranks={0: 2, 1: 2}, modules=4, selection="first", weights="data")
    ups = [_trained(m, k, 1, gen)[1] for k in (0, 1)]
    ups[1].meta["indices"] = torch.tensor([2, 3])  # as if client 1 had drawn modules 2, 3
    m.aggregate(ups, [0.37, 0.63], 1)
    for name, f in m.factors.items():
        assert torch.equal(f.B[:, :2], ups[0].factors[name].B) and torch.equal(f.A[:2], ups[0].factors[name].A)
        assert torch.equal(f.B[:, 2:], ups[1].factors[name].B) and torch.equal(f.A[2:], ups[1].factors[name].A)


@pytest.mark.parametrize("weights", ["uniform", "data"])
def test_all_ranks_R_reproduce_fedit(gen, weights):
    ranks = {0: 3, 1: 3, 2: 3}
    m = _fedplora(ranks=ranks, weights=weights)
    fedit = FedIT(Setup(LAYERS, ranks, {k: S for k in ranks}, seed=3, dtype=torch.float64))
    for name in LAYERS:  # same seed, same draws: the same initial factors
        assert torch.equal(fedit.factors[name].A, m.factors[name].A) and torch.equal(fedit.factors[name].B, m.factors[name].B)
    for rnd in (1, 2):
        pairs = [_trained(m, k, rnd, gen, 10 * (k + 1)) for k in ranks]
        assert all(rel_err(p.init[n].A, fedit.plan(p.client, rnd).init[n].A) < 1e-14 for p, _ in pairs for n in LAYERS)
        ups = [u for _, u in pairs]
        p = data_weights([u.num_examples for u in ups])
        m.aggregate(ups, p, rnd)
        fedit.aggregate(ups, [1 / 3] * 3 if weights == "uniform" else p, rnd)
        for name in LAYERS:
            assert rel_err(m.factors[name].B, fedit.factors[name].B) < 1e-14
            assert rel_err(m.factors[name].A, fedit.factors[name].A) < 1e-14
            assert rel_err(_dense(m.global_delta(), name), _dense(fedit.global_delta(), name)) < 1e-14


def test_result_depends_on_every_client_that_trained_a_module(gen):
    m1, m2 = _fedplora(selection="first"), _fedplora(selection="first")
    ups = [_trained(m1, k, 1, gen)[1] for k in RANKS]
    m1.aggregate(ups, [1 / 3] * 3, 1)
    ups[2].factors["l0.q"].B.add_(1.0)  # client 2 trained module 0 only
    m2.aggregate(ups, [1 / 3] * 3, 1)
    assert rel_err(m1.factors["l0.q"].B[:, 0], m2.factors["l0.q"].B[:, 0]) > 1e-3
    assert torch.equal(m1.factors["l0.q"].B[:, 1:], m2.factors["l0.q"].B[:, 1:])


@pytest.mark.parametrize("dtype, size", [(torch.float64, 8), (torch.float32, 4)])
def test_bytes_match_the_table(gen, dtype, size):
    m = FedPLoRA(Setup(LAYERS, RANKS, {k: S for k in RANKS}, dtype=dtype, options={"modules": 5}))
    per_rank = sum(o + i for o, i in LAYERS.values())
    for k, r in RANKS.items():
        plan = m.plan(k, 1)
        assert plan_nbytes(plan) == size * 5 * per_rank + 8 * r  # all R modules down, plus r_k int64 indices
        u = random_update(k, LAYERS, r, S, 10, gen)
        u.factors = {n: type(f)(f.B.to(dtype), f.A.to(dtype)) for n, f in u.factors.items()}
        assert update_nbytes(m.client_finish(plan, u)) == size * r * per_rank + 8 * r  # r_k modules up, plus indices


def test_update_without_indices_is_refused(gen):
    m = _fedplora()
    plan, u = _trained(m, 1, 1, gen)
    u.meta.clear()
    with pytest.raises(ValueError, match="no module indices"):
        m.aggregate([u], [1.0], 1)
    u.meta["indices"] = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"indices \[0, 1, 2\] do not fit factor ranks \[2\]"):
        m.aggregate([u], [1.0], 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"options": {"selection": "last"}}, r"federation.options.selection: invalid value 'last' for fedplora \(accepted: random, first\)"),
        ({"options": {"weights": "norm"}}, r"federation.options.weights: invalid value 'norm' for fedplora \(accepted: uniform, data, capped\)"),
        ({"options": {"modules": 3}}, r"federation.options.modules: invalid value 3 for fedplora \(accepted: an integer >= max lora.ranks = 4"),
        ({"options": {"modules": 4.5}}, r"federation.options.modules: invalid value 4.5"),
        ({"options": {"modules": -1}}, r"federation.options.modules: invalid value -1"),
        ({"options": {"rank": 4}}, r"federation.options.rank: unknown option for fedplora \(accepted: modules, selection, weight_cap, weights\)"),
        ({"scales": {0: 2.0, 1: 1.0, 2: 2.0}}, r"^lora.scale: fedplora needs one scale s .* got \[1.0, 2.0\]"),
        ({"rank_patterns": {"v": {0: 1, 1: 1, 2: 1}}}, r"^lora.rank_patterns: fedplora needs"),
    ],
)
def test_bad_configurations_are_one_line_errors(kwargs, message):
    setup = {"layers": LAYERS, "ranks": RANKS, "scales": {k: S for k in RANKS}, **kwargs}
    with pytest.raises(MethodError, match=message):
        FedPLoRA(Setup(**setup))


def test_modules_option_sets_R():
    assert _fedplora(modules=4).R == 4 and _fedplora(modules=6.0).R == 6 and _fedplora().R == 4


# --- diagnostics over rounds with partial participation (methods.md §2) ---------------------


def _run_round(m, states, sampled, gen, rnd):
    before = m.global_delta()
    starts, updates, inits = [], [], []
    for k in sampled:
        plan, u = _trained(m, k, rnd, gen, 10 + 7 * k)
        states[k].catch_up(plan)
        starts.append(start_delta(states[k], plan))
        inits.append(init_noise(before, starts[-1], plan))
        updates.append(u)
    w = data_weights([u.num_examples for u in updates])
    m.aggregate(updates, w, rnd)
    return before, m.global_delta(), starts, updates, w, inits


def _dense_agg_noise(before, after, starts, updates, w):
    return dense_agg_noise(before, after, starts, updates, w, LAYERS)


@pytest.mark.parametrize("weights", ["uniform", "data"])
def test_diagnostics_zero_init_noise_and_inexact_aggregation(gen, weights):
    m = _fedplora(weights=weights, modules=5)
    states = {k: ClientState() for k in RANKS}
    for rnd, sampled in enumerate([(0, 1, 2), (0, 2), (1, 2), (1,)], start=1):
        before, after, starts, updates, w, inits = _run_round(m, states, sampled, gen, rnd)
        assert all(x is not None and x < 1e-12 for x in inits)  # Select-N-Fold: zero init noise, every round
        noise = agg_noise(before, after, starts, updates, w)
        assert abs(noise - _dense_agg_noise(before, after, starts, updates, w)) < 1e-10 * max(noise, 1e-3)
        if len(sampled) > 1:
            assert noise > 1e-3  # averaging factors per module is not averaging products
        else:
            assert noise < 1e-12  # one client: its modules are copied, the rest kept: exactly M_k
