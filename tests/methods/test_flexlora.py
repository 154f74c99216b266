"""methods.md §3 items 8 and 11 for FlexLoRA, its options, rank patterns and diagnostics, in float64.

Diagnostics theory (methods.md §2). FlexLoRA clients train on W_0 (no base updates, no fold), so
M_k = W_0 + s_k B_k A_k, and G_t = W_0 + ΔW_g. Ideal Δ*_t = Σ p_k (M_k − G_t) = Σ p_k s_k B_k A_k − ΔW_g
(Σ p_k = 1), hence G_t + Δ*_t = W_0 + Σ p_k s_k B_k A_k = G_{t+1}: agg_noise = 0 with ``weights: data``.
The SVD truncation costs nothing at aggregation; it shows up as init_noise_k =
sqrt(Σ_layers Σ_{i>r_k} σ_i²) / sqrt(Σ_layers Σ_i σ_i²), zero iff r_k ≥ rank(ΔW_g) on every layer.
With ``weights: uniform`` and unequal n_k, agg_noise = ‖Σ (1/K − p_k) s_k B_k A_k‖ / ‖Δ*_t‖ > 0.
"""

import math

import pytest
import torch

from tests.dense_reference import dense, dense_agg_noise, run_round

from fedlora.methods import MethodError
from fedlora.methods import flexlora as flexlora_module
from fedlora.methods.base import ClientUpdate, Factors, Setup, plan_nbytes, update_nbytes
from fedlora.methods.flexlora import FlexLoRA
from fedlora.ops.weights import data_weights
from fedlora.federation.diagnostics import agg_noise
from fedlora.train.client import ClientState

from tests.conftest import random_update, rel_err

LAYERS = {"l0.q": (12, 10), "l0.mlp": (8, 9)}
RANKS = {0: 4, 1: 2, 2: 1}
SCALES = {0: 2.0, 1: 0.5, 2: 3.0}  # unequal s_k on purpose
F64 = torch.float64


def _flex(ranks=RANKS, patterns=None, dtype=F64, layers=LAYERS, **options) -> FlexLoRA:
    scales = {k: SCALES.get(k, 1.5) for k in ranks}
    return FlexLoRA(Setup(layers, ranks, scales, seed=0, dtype=dtype, options=options, rank_patterns=patterns or {}))


def _update(m: FlexLoRA, k: int, n: int, gen: torch.Generator) -> ClientUpdate:
    """Random trained factors at client k's per-layer ranks."""
    factors = {}
    for name, (d_out, d_in) in m.setup.layers.items():
        r = m.setup.rank_of(k, name)
        factors[name] = Factors(torch.randn(d_out, r, generator=gen, dtype=F64), torch.randn(r, d_in, generator=gen, dtype=F64))
    return ClientUpdate(client=k, num_examples=n, scale=m.setup.scales[k], factors=factors)


def _round(m: FlexLoRA, gen, clients=(0, 1, 2), n=(10, 30, 60), rnd=1):
    updates = [_update(m, k, n[i], gen) for i, k in enumerate(clients)]
    weights = data_weights([u.num_examples for u in updates])
    m.aggregate(updates, weights, rnd)
    return updates, weights


def _weighted_sum(updates, weights, name):
    return sum(p * u.scale * u.factors[name].B @ u.factors[name].A for u, p in zip(updates, weights))


def _global(m, name):
    return sum(t.dense() for t in m.global_delta()[name])


def test_aggregate_is_the_exact_weighted_sum_as_one_stacked_pair(gen):
    m = _flex()
    updates, weights = _round(m, gen)
    for name, (d_out, d_in) in LAYERS.items():
        (term,) = m.global_delta()[name]
        assert term.B.shape == (d_out, 7) and term.A.shape == (7, d_in)  # stacked, not densified
        assert rel_err(term.dense(), _weighted_sum(updates, weights, name)) < 1e-12


def test_uniform_weights_option(gen):
    m = _flex(weights="uniform")
    updates, _ = _round(m, gen)
    assert rel_err(_global(m, "l0.q"), _weighted_sum(updates, [1 / 3] * 3, "l0.q")) < 1e-12


def test_global_is_the_latest_round_not_accumulated(gen):
    m = _flex()
    _round(m, gen, rnd=1)
    updates, weights = _round(m, gen, clients=(1, 2), n=(5, 15), rnd=2)
    for name in LAYERS:
        assert len(m.global_delta()[name]) == 1
        assert rel_err(_global(m, name), _weighted_sum(updates, weights, name)) < 1e-12


def test_round_one_is_a_fresh_adapter():
    m = _flex()
    assert m.global_delta() == {name: [] for name in LAYERS}
    plan = m.plan(0, 1)
    assert plan.init is None and plan.rank == 4 and plan.scale == 2.0
    assert plan.base is None and plan.fold == {} and plan_nbytes(plan) == 0


def test_truncation_error_is_the_tail_of_the_spectrum_and_matches_the_dense_svd(gen):
    m = _flex()
    _round(m, gen)
    for k, r in RANKS.items():
        plan = m.plan(k, 2)
        assert plan.scale == SCALES[k]
        for name, (d_out, d_in) in LAYERS.items():
            f = plan.init[name]
            assert f.B.shape == (d_out, r) and f.A.shape == (r, d_in)
            dense = _global(m, name)
            u, s, vh = torch.linalg.svd(dense)
            approx = SCALES[k] * f.B @ f.A
            assert abs(float(torch.linalg.norm(dense - approx)) - float(s[r:].square().sum().sqrt())) < 1e-12 * float(s[0])
            assert rel_err(f.A @ f.A.T, torch.eye(r, dtype=F64)) < 1e-12  # orthonormal rows
            assert rel_err(torch.linalg.norm(SCALES[k] * f.B, dim=0), s[:r]) < 1e-12  # σ_1..σ_r
            assert rel_err(approx, u[:, :r] @ torch.diag(s[:r]) @ vh[:r]) < 1e-12  # the dense rank-r SVD


def test_exact_and_padded_with_live_orthonormal_rows_when_rank_exceeds_the_update(gen):
    m = _flex()
    _round(m, gen, clients=(1, 2), n=(1, 3))  # rank(ΔW_g) = 2 + 1 = 3 < r_0 = 4
    plan = m.plan(0, 2)
    for name in LAYERS:
        f, dense = plan.init[name], _global(m, name)
        assert rel_err(2.0 * f.B @ f.A, dense) < 1e-12  # exact: nothing truncated
        assert torch.count_nonzero(f.B[:, 3:]) == 0  # the padded component starts at zero ...
        assert rel_err(f.A @ f.A.T, torch.eye(4, dtype=F64)) < 1e-12  # ... with a unit A row, so it trains
        assert float(torch.linalg.norm(f.A[3:] @ dense.T)) < 1e-12 * float(torch.linalg.norm(dense))  # off the range of ΔW_gᵀ
    again = m.plan(0, 2)  # the padding is seeded: the same plan twice
    assert all(torch.equal(again.init[n].A, plan.init[n].A) for n in LAYERS)


def test_the_svd_is_low_rank_and_taken_once_per_round(gen, monkeypatch):
    calls, shapes = [], []
    real_lowrank, real_svd = flexlora_module.lowrank_svd, torch.linalg.svd

    def counting(terms):
        calls.append(sum(t.rank for t in terms))
        return real_lowrank(terms)

    def recording(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return real_svd(x, *args, **kwargs)

    monkeypatch.setattr(flexlora_module, "lowrank_svd", counting)
    monkeypatch.setattr(torch.linalg, "svd", recording)
    m = _flex()
    _round(m, gen, rnd=1)
    for k in RANKS:
        m.plan(k, 2)
    assert calls == [7, 7]  # one per layer, shared by all three clients
    assert shapes == [(7, 7), (7, 7)]  # the Σr × Σr core, never the 12×10 or 8×9 matrix
    _round(m, gen, clients=(0, 2), n=(4, 4), rnd=2)
    m.plan(1, 3), m.plan(2, 3)
    assert calls == [7, 7, 5, 5]


def test_rank_patterns_reach_the_plan_and_the_init_factors(gen):
    patterns = {"mlp": {0: 6, 1: 3, 2: 1}}  # e.g. a wider rank on the MLP
    m = _flex(patterns=patterns)
    assert m.plan(0, 1).rank_pattern == {"l0.mlp": 6}  # round 1 too
    _round(m, gen)  # Σr = 4+2+1 on l0.q, 6+3+1 → 8 = min(8, 9) triplets on l0.mlp
    for k, want in {0: {"l0.mlp": 6}, 1: {"l0.mlp": 3}, 2: {}}.items():
        plan = m.plan(k, 2)
        assert plan.rank == RANKS[k] and plan.rank_pattern == want
        for name, (d_out, d_in) in LAYERS.items():
            r = m.setup.rank_of(k, name)
            assert plan.init[name].B.shape == (d_out, r) and plan.init[name].A.shape == (r, d_in)
        d = sum(r * (o + i) for (o, i), r in zip(LAYERS.values(), (RANKS[k], m.setup.rank_of(k, "l0.mlp"))))
        assert plan_nbytes(plan) == 8 * d


def test_downlink_and_uplink_are_r_k_times_d_in_plus_d_out(gen):
    d = sum(o + i for o, i in LAYERS.values())
    for dtype, size in ((F64, 8), (torch.float32, 4)):
        m = _flex(dtype=dtype)
        _round(m, gen)
        for k, r in RANKS.items():
            assert plan_nbytes(m.plan(k, 2)) == size * r * d
    u = random_update(1, LAYERS, 2, 0.5, 5, gen)
    assert update_nbytes(u) == 8 * 2 * d


def test_options_and_ranks_are_checked():
    with pytest.raises(MethodError, match=r"^federation\.options\.weights: invalid value 'size' for flexlora \(accepted: data, uniform, capped\)$"):
        _flex(weights="size")
    with pytest.raises(MethodError, match=r"^federation\.options\.wieghts: unknown option for flexlora \(accepted: weight_cap, weights\)$"):
        _flex(wieghts="data")
    with pytest.raises(MethodError, match=r"^lora\.ranks: flexlora cannot give client 1 rank 9 on layer l0\.mlp \(8×9\) \(accepted: 1\.\.8\)$"):
        _flex(ranks={0: 4, 1: 9})
    with pytest.raises(MethodError, match=r"^lora\.rank_patterns: flexlora cannot give client 0 rank 11"):
        _flex(patterns={"q": {0: 11, 1: 2, 2: 1}})


# ---- diagnostics over rounds with partial participation (test_diagnostics.py's pattern) ----

DLAYERS = {"a": (9, 7), "b": (8, 7)}


def _dense(delta, name):
    return dense(delta, name, DLAYERS)


def _run_round(method, states, sampled, ranks, scales, gen, rnd):
    return run_round(method, states, sampled, ranks, scales, gen, rnd, DLAYERS)


def _dense_agg_noise(before, after, starts, updates, w):
    return dense_agg_noise(before, after, starts, updates, w, DLAYERS)


def _dense_init_noise(before, rank):
    tail2 = total2 = 0.0
    for name in DLAYERS:
        s = torch.linalg.svdvals(_dense(before, name))
        tail2 += float(s[rank:].square().sum())
        total2 += float(s.square().sum())
    return math.sqrt(tail2 / total2)


def test_agg_noise_is_zero_and_init_noise_is_the_spectral_tail_under_partial_participation(gen):
    ranks, scales = {0: 6, 1: 2, 2: 1}, {0: 2.0, 1: 1.0, 2: 4.0}
    m = FlexLoRA(Setup(DLAYERS, ranks, scales, dtype=F64))
    states = {k: ClientState() for k in ranks}
    seen = []
    for rnd, sampled in enumerate([(0, 1, 2), (1, 2), (0, 2)], start=1):
        before, after, starts, updates, w, inits = _run_round(m, states, sampled, ranks, scales, gen, rnd)
        assert agg_noise(before, after, starts, updates, w) < 1e-12
        assert _dense_agg_noise(before, after, starts, updates, w) < 1e-12
        for k, got in zip(sampled, inits):
            want = _dense_init_noise(before, ranks[k]) if rnd > 1 else 0.0  # round 1: G_1 = W_0, fresh adapters
            assert abs(got - want) < 1e-10
            seen.append((rnd, k, got))
    # round 2: rank(ΔW_g) = 7 (Σr = 9 capped by d_in): both clients truncate
    assert all(x > 1e-3 for rnd, k, x in seen if rnd == 2)
    # round 3: rank(ΔW_g) = 2 + 1 = 3: client 0 (rank 6) starts exactly on G_t, client 2 (rank 1) does not
    assert [x < 1e-12 for rnd, k, x in seen if rnd == 3] == [True, False]


def test_uniform_weights_agg_noise_matches_the_dense_definition(gen):
    ranks, scales = {0: 3, 1: 2, 2: 1}, {0: 2.0, 1: 1.0, 2: 4.0}
    m = FlexLoRA(Setup(DLAYERS, ranks, scales, dtype=F64, options={"weights": "uniform"}))
    states = {k: ClientState() for k in ranks}
    for rnd, sampled in enumerate([(0, 1, 2), (0, 2)], start=1):
        before, after, starts, updates, w, _ = _run_round(m, states, sampled, ranks, scales, gen, rnd)
        got = agg_noise(before, after, starts, updates, w)
        assert got > 1e-3  # p_k ≠ 1/K: the server's sum is not FedAvg's
        assert abs(got - _dense_agg_noise(before, after, starts, updates, w)) < 1e-10 * got
