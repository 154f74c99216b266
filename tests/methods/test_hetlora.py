"""HETLoRA: methods.md §3 items 5, 7 and 11, the tail regulariser, self-pruning and diagnostics, in float64."""

import math

import pytest
import torch

from fedlora.methods import MethodError, Setup
from fedlora.methods.base import ClientUpdate, Factors, client_finish, plan_nbytes, update_nbytes
from fedlora.methods.hetlora import HetLoRA, head, pruned_rank, tail_norm
from fedlora.ops.lowrank import kaiming_A, pad, seeded_generator, truncate
from fedlora.ops.weights import data_weights
from fedlora.federation.diagnostics import agg_noise, init_noise
from fedlora.train.client import ClientState, start_delta

from tests.conftest import random_update, rel_err

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 10)}
D = sum(o + i for o, i in LAYERS.values())  # Σ (d_out + d_in) per unit of rank
RANKS = {0: 4, 1: 2, 2: 1}
SCALES = {0: 2.0, 1: 2.0, 2: 2.0}


def _het(ranks=RANKS, scales=SCALES, layers=LAYERS, dtype=torch.float64, rank_patterns=None, **options):
    return HetLoRA(Setup(layers, ranks, scales, seed=0, dtype=dtype, options=options, rank_patterns=rank_patterns or {}))


def _step(plan, gen, tail_factor=None, n=None):
    """A client's trained factors: its init plus a random step; with tail_factor the tail is init's tail × it."""
    factors = {}
    for name, f in plan.init.items():
        h = head(f.rank, plan.meta["gamma"])
        B = f.B + 0.1 * torch.randn(f.B.shape, generator=gen, dtype=torch.float64)
        A = f.A + 0.1 * torch.randn(f.A.shape, generator=gen, dtype=torch.float64)
        if tail_factor is not None:
            B[:, h:], A[h:] = tail_factor * f.B[:, h:], f.A[h:]
        factors[name] = Factors(B, A)
    return ClientUpdate(client=plan.client, num_examples=n or 10 + 7 * plan.client, scale=plan.scale, factors=factors)


def _round(m, gen, clients=(0, 1, 2), rnd=1, tail_factor=None):
    """Plan, 'train', finish (self-prune) and aggregate; returns the plans and the uploaded updates."""
    plans = {k: m.plan(k, rnd) for k in clients}
    updates = [client_finish(m, plans[k], _step(plans[k], gen, tail_factor)) for k in clients]
    m.aggregate(updates, data_weights([u.num_examples for u in updates]), rnd)
    return plans, updates


def _dense(m, name):
    (g,) = m.global_delta()[name]
    return g.B @ g.A


def test_initial_state_and_first_plan():
    m = _het()
    gen = seeded_generator(0, 0)
    for name, (d_out, d_in) in LAYERS.items():  # A_g = kaiming (seeded, layers in order), B_g = 0, R = 4
        (g,) = m.global_delta()[name]
        assert torch.equal(g.A, kaiming_A(4, d_in, gen, torch.float64)) and torch.count_nonzero(g.B) == 0
        assert g.B.shape == (d_out, 4)
    plan = m.plan(1, 1)
    assert plan.rank == 2 and plan.rank_pattern == {} and plan.scale == 2.0
    for name, f in plan.init.items():
        assert f.B.shape == (LAYERS[name][0], 2) and torch.count_nonzero(f.B) == 0
        assert torch.equal(f.A, m.global_delta()[name][0].A[:2])
    assert plan.meta == {"gamma": 0.99, "reg": 0.01, "r_min": 1}
    assert all(not isinstance(v, torch.Tensor) for v in plan.meta.values())  # config, not wire


def test_truncate_then_pad_is_identity(gen):
    B, A = torch.randn(12, 2, generator=gen, dtype=torch.float64), torch.randn(2, 10, generator=gen, dtype=torch.float64)
    Bp, Ap = pad(B, A, 4)
    assert torch.equal(Bp[:, 2:], torch.zeros(12, 2, dtype=torch.float64)) and torch.equal(Ap[2:], torch.zeros(2, 10, dtype=torch.float64))
    Bt, At = truncate(Bp, Ap, 2)
    assert torch.equal(Bt, B) and torch.equal(At, A)
    # through the server: one client's upload, padded, aggregated (w = 1) and truncated back to it
    for scale in (2.0, 0.3):
        m = _het(scales={0: 2.0, 1: scale, 2: 2.0})
        u = random_update(1, LAYERS, 2, scale, 10, gen)
        m.aggregate([u], [1.0], 1)
        assert m.last_weights == [1.0]
        plan = m.plan(1, 2)
        for name in LAYERS:
            assert rel_err(plan.init[name].B, u.factors[name].B) < 1e-15 and torch.equal(plan.init[name].A, u.factors[name].A)
            (g,) = m.global_delta()[name]
            assert torch.count_nonzero(g.B[:, 2:]) == 0 and torch.count_nonzero(g.A[2:]) == 0


def test_norm_weights_and_zero_padded_average(gen):
    m = _het()
    updates = [random_update(k, LAYERS, RANKS[k], 2.0, n, gen) for k, n in zip(RANKS, (10, 30, 60))]
    updates[2].factors["l0.q"].B.mul_(5.0)  # a large update must get a large weight, whatever its n_k
    m.aggregate(updates, data_weights([10, 30, 60]), 1)
    norms = [math.sqrt(sum(float(torch.linalg.norm(2.0 * f.B @ f.A)) ** 2 for f in u.factors.values())) for u in updates]
    w = [x / sum(norms) for x in norms]
    assert max(abs(a - b) for a, b in zip(m.last_weights, w)) < 1e-12
    assert abs(sum(m.last_weights) - 1.0) < 1e-15 and all(x > 0 for x in m.last_weights)
    for name in LAYERS:
        B_g = sum(wk * pad(u.factors[name].B, u.factors[name].A, 4)[0] for u, wk in zip(updates, w))
        A_g = sum(wk * pad(u.factors[name].B, u.factors[name].A, 4)[1] for u, wk in zip(updates, w))
        (g,) = m.global_delta()[name]
        assert rel_err(g.B, 2.0 * B_g) < 1e-12 and rel_err(g.A, A_g) < 1e-12
        assert rel_err(_dense(m, name), 2.0 * B_g @ A_g) < 1e-12  # s · B_g A_g with the common s


def test_data_weights_option(gen):
    m = _het(weights="data")
    updates = [random_update(k, LAYERS, RANKS[k], 2.0, n, gen) for k, n in zip(RANKS, (10, 30, 60))]
    p = data_weights([10, 30, 60])
    m.aggregate(updates, p, 1)
    assert m.last_weights == p
    A_g = sum(pk * pad(u.factors["l0.v"].B, u.factors["l0.v"].A, 4)[1] for u, pk in zip(updates, p))
    assert rel_err(m.global_delta()["l0.v"][0].A, A_g) < 1e-14


def test_unequal_scales_every_client_starts_from_the_truncated_global(gen):
    scales = {0: 2.0, 1: 0.5, 2: 3.0}
    m = _het(scales=scales)
    updates = [random_update(k, LAYERS, RANKS[k], scales[k], 10, gen) for k in RANKS]
    m.aggregate(updates, data_weights([10, 10, 10]), 1)
    w = m.last_weights
    for name in LAYERS:
        B_t = sum(wk * pad(u.scale * u.factors[name].B, u.factors[name].A, 4)[0] for u, wk in zip(updates, w))
        A_g = sum(wk * pad(u.factors[name].B, u.factors[name].A, 4)[1] for u, wk in zip(updates, w))
        assert rel_err(_dense(m, name), B_t @ A_g) < 1e-12
        for k, r in RANKS.items():
            f = m.plan(k, 2).init[name]
            assert rel_err(scales[k] * f.B @ f.A, B_t[:, :r] @ A_g[:r]) < 1e-12
    f = m.plan(0, 2).init["l0.q"]  # r_0 = R: the client's step-0 model is the global model
    assert rel_err(2.0 * f.B @ f.A, _dense(m, "l0.q")) < 1e-14


def test_regulariser_value_and_gradient_on_hand_numbers():
    m = _het(ranks={0: 2}, scales={0: 1.0}, layers={"a": (2, 2), "b": (2, 3)}, gamma=0.5, reg=0.1)
    reg = m.client_regularizer(m.plan(0, 1))  # h = ⌊0.5 · 2⌋ = 1: the tail is component 1
    def t(rows):
        return torch.tensor(rows, dtype=torch.float64, requires_grad=True)

    live = {"a": (t([[1, 3], [2, 4]]), t([[9, 9], [0, 2]])), "b": (t([[5, 0], [5, 12]]), t([[1, 1, 1], [3, 0, 4]]))}
    value = reg(live)  # 0.1 · (‖(3,4)‖·‖(0,2)‖ + ‖(0,12)‖·‖(3,0,4)‖) = 0.1 · (5·2 + 12·5) = 7
    assert abs(value.item() - 7.0) < 1e-14
    value.backward()  # d/dB_t = λ‖A_t‖ B_t/‖B_t‖, d/dA_t = λ‖B_t‖ A_t/‖A_t‖, zero on the head
    expect = {
        "a": ([[0, 0.12], [0, 0.16]], [[0, 0], [0, 0.5]]),
        "b": ([[0, 0], [0, 0.5]], [[0, 0, 0], [0.72, 0, 0.96]]),
    }
    for name, (gB, gA) in expect.items():
        assert rel_err(live[name][0].grad, torch.tensor(gB, dtype=torch.float64)) < 1e-14
        assert rel_err(live[name][1].grad, torch.tensor(gA, dtype=torch.float64)) < 1e-14
    assert _het(reg=0.0).client_regularizer(_het(reg=0.0).plan(0, 1)) is None


def test_default_gamma_penalises_only_the_last_component(gen):
    m = _het()
    f64 = torch.float64
    live = {n: (torch.randn(o, 4, generator=gen, dtype=f64), torch.randn(4, i, generator=gen, dtype=f64)) for n, (o, i) in LAYERS.items()}
    got = float(m.client_regularizer(m.plan(0, 1))(live))  # ⌊0.99 · 4⌋ = 3
    want = 0.01 * sum(float(torch.linalg.norm(B[:, 3]) * torch.linalg.norm(A[3])) for B, A in live.values())
    assert abs(got - want) < 1e-14 * want


def test_head_and_pruned_rank_arithmetic():
    # γ = 0.99: ⌊0.99 r⌋ = r − ⌈r/100⌉, so r − 1 for 1 ≤ r ≤ 100 and r − 2 for 101 ≤ r ≤ 200: never r.
    assert all(head(r, 0.99) == r - 1 for r in range(1, 101))
    assert all(head(r, 0.99) == r - 2 for r in range(101, 201))
    assert pruned_rank(1, 0.99, 1) == 1 and pruned_rank(2, 0.99, 1) == 1 and pruned_rank(64, 0.99, 1) == 63
    assert all(head(r, 1.0) == r and pruned_rank(r, 1.0, 1) == r for r in range(1, 300))  # ⌊γr⌋ = r: nothing pruned
    assert head(100, 0.29) == 29  # the decimal γ, not the float 0.28999…
    assert pruned_rank(5, 0.5, 3) == 3 and pruned_rank(8, 0.5, 3) == 4 and pruned_rank(2, 0.5, 3) == 2


def test_pruning_happens_exactly_when_the_tail_norm_fell(gen):
    m = _het()
    plan = m.plan(0, 1)  # B_g = 0: the tail norm starts at 0 and cannot fall in the first round
    assert client_finish(m, plan, _step(plan, gen)).factors["l0.q"].rank == 4
    _round(m, gen)  # the global factors are nonzero now
    plan = m.plan(0, 2)
    start = float(tail_norm({n: (f.B, f.A) for n, f in plan.init.items()}, 0.99))
    assert start > 0
    for factor, kept in ((0.5, 3), (1 - 1e-9, 3), (1.0, 4), (1.5, 4)):
        trained = _step(plan, gen, factor)
        out = client_finish(m, plan, trained)
        assert out.meta["rank"] == kept and isinstance(out.meta["rank"], int)
        for name, f in out.factors.items():
            assert f.rank == kept
            assert torch.equal(f.B, trained.factors[name].B[:, :kept]) and torch.equal(f.A, trained.factors[name].A[:kept])
        assert update_nbytes(out) == 8 * kept * D  # uplink: only the kept components; meta ints are free
    plan = m.plan(2, 2)  # r = 1 = r_min: the tail is everything and pruning keeps max(r_min, 0) = 1
    assert client_finish(m, plan, _step(plan, gen, 0.5)).factors["l0.v"].rank == 1


def test_gamma_one_never_prunes(gen):
    m = _het(gamma=1.0)
    _round(m, gen)
    plan = m.plan(0, 2)
    assert float(m.client_regularizer(plan)({n: (f.B, f.A) for n, f in plan.init.items()})) == 0.0  # empty tail
    out = client_finish(m, plan, _step(plan, gen))
    assert out.meta["rank"] == 4 and all(f.rank == 4 for f in out.factors.values())


def test_ranks_never_grow_and_stay_at_least_r_min_across_rounds(gen):
    ranks = {0: 6, 1: 5, 2: 4}
    m = _het(ranks=ranks, scales={k: 2.0 for k in ranks}, r_min=2)
    seen = {k: [r] for k, r in ranks.items()}
    schedule = [(0, 1, 2), (0, 1, 2), (0, 1), (0, 2), (0, 1, 2), (0, 1, 2)]
    for rnd, clients in enumerate(schedule, start=1):
        plans, updates = _round(m, gen, clients, rnd, tail_factor=None if rnd == 1 else 0.5)  # then every tail shrinks
        for k, u in zip(clients, updates):
            r_old = plans[k].rank
            assert u.meta["rank"] == (r_old if rnd == 1 else pruned_rank(r_old, 0.99, 2))  # round 1: B_g = 0
        for k in ranks:
            plan = m.plan(k, rnd + 1)  # the server keeps what each client pruned to
            assert 2 <= plan.rank <= seen[k][-1]
            assert all(f.rank == plan.rank for f in plan.init.values())
            seen[k].append(plan.rank)
    assert seen == {0: [6, 6, 5, 4, 3, 2, 2], 1: [5, 5, 4, 3, 3, 2, 2], 2: [4, 4, 3, 3, 2, 2, 2]}  # absent: unchanged


def test_an_upload_above_the_current_rank_is_refused(gen):
    m = _het()
    _round(m, gen)
    _round(m, gen, clients=(0,), rnd=2, tail_factor=0.5)  # client 0 prunes 4 → 3
    assert m.plan(0, 3).rank == 3
    with pytest.raises(ValueError, match=r"client 0 uploaded rank 4 on l0.q; allowed 1..3"):
        m.aggregate([random_update(0, LAYERS, 4, 2.0, 10, gen)], [1.0], 3)


def test_per_layer_rank_patterns_prune_together(gen):
    patterns = {"v": {0: 6, 1: 3, 2: 2}}
    m = _het(rank_patterns=patterns)
    assert m.R == {"l0.q": 4, "l0.v": 6}
    _round(m, gen)
    plan = m.plan(1, 2)
    assert plan.rank == 2 and plan.rank_pattern == {"l0.v": 3}
    assert plan.init["l0.q"].rank == 2 and plan.init["l0.v"].rank == 3
    out = client_finish(m, plan, _step(plan, gen, 0.5))  # one decision on Σ_layers, applied to every layer
    assert out.factors["l0.q"].rank == 1 and out.factors["l0.v"].rank == 2
    m.aggregate([out], [1.0], 2)
    plan = m.plan(1, 3)
    assert plan.rank == 1 and plan.rank_pattern == {"l0.v": 2}
    assert plan_nbytes(plan) == 8 * (1 * (12 + 10) + 2 * (6 + 10))


def test_byte_counts_match_the_table(gen):
    for dtype, size in ((torch.float64, 8), (torch.float32, 4)):
        m = _het(dtype=dtype)
        for k, r in RANKS.items():
            assert plan_nbytes(m.plan(k, 1)) == size * r * D  # downlink r_k (d_in + d_out)
            assert update_nbytes(random_update(k, LAYERS, r, 2.0, 5, gen)) == 8 * r * D  # uplink r_k (d_in + d_out)
    m = _het()
    _round(m, gen)
    _round(m, gen, clients=(0,), rnd=2, tail_factor=0.5)
    assert plan_nbytes(m.plan(0, 3)) == 8 * 3 * D  # after pruning: the pruned rank both ways


def test_options_are_checked():
    m = _het()
    assert (m.gamma, m.reg, m.r_min, m.by_norm) == (0.99, 0.01, 1, True)
    cases = [
        ({"gamma": 0.0}, r"gamma: invalid value 0.0 for hetlora \(accepted: a number in \(0.0, 1.0\]\)"),
        ({"gamma": 1.5}, r"gamma: invalid value 1.5 for hetlora \(accepted: a number in \(0.0, 1.0\]\)"),
        ({"reg": -0.1}, r"reg: invalid value -0.1 for hetlora \(accepted: a number in \[0.0, inf\]\)"),
        ({"r_min": 0}, r"r_min: invalid value 0 for hetlora \(accepted: an integer in \[1, inf\]\)"),
        ({"r_min": 1.5}, r"r_min: invalid value 1.5 for hetlora \(accepted: an integer in \[1, inf\]\)"),
        ({"r_min": 2}, r"r_min: invalid value 2 for hetlora \(accepted: an integer in \[1, 1\], the smallest client rank\)"),
        ({"weights": "size"}, r"weights: invalid value 'size' for hetlora \(accepted: norm, data\)"),
        ({"gama": 0.9}, r"gama: unknown option for hetlora \(accepted: gamma, r_min, reg, weights\)"),
    ]
    for options, message in cases:
        with pytest.raises(MethodError, match=r"^federation\.options\." + message + "$"):
            _het(**options)
    with pytest.raises(MethodError, match=r"^lora\.scale: hetlora needs every s_k > 0"):
        _het(scales={0: 2.0, 1: 0.0, 2: 2.0})


def test_diagnostics_over_rounds_with_partial_participation(gen):
    ranks = {0: 4, 1: 2, 2: 1, 3: 4}
    m = _het(ranks=ranks, scales={k: 2.0 for k in ranks})
    states = {k: ClientState() for k in ranks}
    schedule = [  # client → tail factor of its local step; round 3: clients 0 and 1 prune
        {0: None, 1: None, 2: None, 3: None},
        {0: 2.0, 2: 2.0},
        {0: 0.5, 1: 0.5, 3: 2.0},
        {0: 2.0, 1: 2.0, 2: 2.0, 3: 2.0},
    ]
    for rnd, tails in enumerate(schedule, start=1):
        before = m.global_delta()
        plans = {k: m.plan(k, rnd) for k in tails}
        starts, inits = [], {}
        for k in tails:
            states[k].catch_up(plans[k])
            starts.append(start_delta(states[k], plans[k]))
            inits[k] = init_noise(before, starts[-1], plans[k])
        updates = [client_finish(m, plans[k], _step(plans[k], gen, t)) for k, t in tails.items()]
        w = data_weights([u.num_examples for u in updates])
        m.aggregate(updates, w, rnd)
        assert agg_noise(before, m.global_delta(), starts, updates, w) > 1e-3
        for k in tails:
            if rnd == 1:
                assert inits[k] == 0.0  # G_0 = W_0 and every start is B = 0
            elif plans[k].rank == 4:  # r_k = R: the whole global pair
                assert inits[k] < 1e-12
            else:  # truncated: r_k < R, including client 0 once it pruned in round 3
                assert inits[k] > 1e-3
    assert plans[0].rank == 3 and plans[1].rank == 1 and plans[3].rank == 4


def test_one_full_rank_client_is_exact(gen):
    m = _het()
    _round(m, gen)
    before, plan = m.global_delta(), m.plan(0, 2)
    update = _step(plan, gen, 2.0)
    m.aggregate([update], [1.0], 2)
    assert agg_noise(before, m.global_delta(), [{}], [update], [1.0]) < 1e-12


def test_client_starts_from_the_global_model_on_a_tiny_llama(tiny_llama, gen):
    from fedlora.model.adapters import AdapterHost
    from fedlora.model.loading import target_layer_shapes

    shapes = target_layer_shapes(tiny_llama, ["q_proj", "v_proj"])
    host = AdapterHost(tiny_llama, list(shapes))
    m = _het(ranks={0: 4, 1: 2}, scales={0: 2.0, 1: 2.0}, layers=shapes, rank_patterns={"v_proj": {0: 3, 1: 1}})
    updates = [random_update(k, shapes, 0, 2.0, 10, gen) for k in (0, 1)]
    for k, u in enumerate(updates):  # small trained factors at each client's per-layer ranks
        for name in shapes:
            r = m.plan(k, 1).init[name].rank
            (d_out, d_in), f64 = shapes[name], torch.float64
            u.factors[name] = Factors(0.05 * torch.randn(d_out, r, generator=gen, dtype=f64), torch.randn(r, d_in, generator=gen, dtype=f64))
    m.aggregate(updates, [0.5, 0.5], 1)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    host.set_delta(m.global_delta())
    with torch.no_grad():
        glob = host.model(input_ids=ids).logits
    host.restore()
    for k, same in ((0, True), (1, False)):
        plan = m.plan(k, 2)
        with host.adapter(plan.rank, plan.scale, ["q_proj", "v_proj"], init=plan.init, rank_pattern=plan.rank_pattern) as pm:
            with torch.no_grad():
                logits = pm(input_ids=ids).logits
            live = host.live_factors(pm)
            penalty = m.client_regularizer(plan)(live)
            want = 0.01 * float(tail_norm({n: (f.B, f.A) for n, f in plan.init.items()}, 0.99))
            assert abs(penalty.item() - want) < 1e-12 * want
            penalty.backward()
            h = head(live["model.layers.0.self_attn.q_proj"][1].shape[0], 0.99)
            assert torch.count_nonzero(live["model.layers.0.self_attn.q_proj"][0].grad[:, :h]) == 0
        assert (rel_err(logits, glob) < 1e-12) == same


def _scaled_updates(updates, cB=1.0, cA=1.0, only=None):
    """The same uploads with B × cB and A × cA (for the clients in ``only``; all when None)."""
    return [ClientUpdate(client=u.client, num_examples=u.num_examples, scale=u.scale,
                         factors={n: Factors(f.B * cB, f.A * cA) if only is None or u.client in only else f for n, f in u.factors.items()})
            for u in updates]


@pytest.mark.parametrize("cB,cA", [(1e160, 1.0), (2.0**600, 2.0**600), (1e-170, 1.0), (2.0**-560, 2.0**-560)])
def test_norm_weights_are_finite_and_exact_far_outside_the_range_of_squares(gen, cB, cA):
    """‖s B A‖_F past ~1e154 overflows its square in float64 (NaN weights), below ~1e-154 it underflows (weights fall
    back to p_k): the weights are scale-free, so every client scaled alike must keep the weights of the unscaled uploads."""
    scales = {0: 2.0, 1: 0.5, 2: 3.0}
    updates = [random_update(k, LAYERS, RANKS[k], scales[k], n, gen) for k, n in zip(RANKS, (10, 30, 60))]
    p = data_weights([10, 30, 60])
    norms = [u.scale * math.sqrt(sum(float(torch.linalg.norm(f.B @ f.A)) ** 2 for f in u.factors.values())) for u in updates]
    want = [x / sum(norms) for x in norms]  # dense float64 reference, in the ordinary range
    plain = _het(scales=scales)
    plain.aggregate(updates, p, 1)
    assert max(abs(a - b) for a, b in zip(plain.last_weights, want)) < 1e-14
    m = _het(scales=scales)
    m.aggregate(_scaled_updates(updates, cB, cA), p, 1)
    assert all(math.isfinite(x) for x in m.last_weights) and abs(sum(m.last_weights) - 1.0) < 1e-15
    assert max(abs(a - b) / b for a, b in zip(m.last_weights, want)) < 1e-14
    if math.frexp(cB)[0] == 0.5 and math.frexp(cA)[0] == 0.5:  # powers of two scale exactly: the same numbers
        assert m.last_weights == plain.last_weights


def test_one_huge_update_takes_all_the_weight_without_nan(gen):
    updates = [random_update(k, LAYERS, RANKS[k], 2.0, n, gen) for k, n in zip(RANKS, (10, 30, 60))]
    m = _het()
    m.aggregate(_scaled_updates(updates, 1e200, only={1}), data_weights([10, 30, 60]), 1)
    w = m.last_weights
    assert all(math.isfinite(x) for x in w) and w[1] == 1.0 and 0 < w[0] < 1e-190 and 0 < w[2] < 1e-190
    for name in LAYERS:  # B̃_g = Σ w_k pad(s_k B_k): client 1's scaled B, to round-off
        (g,) = m.global_delta()[name]
        want_B = pad(2.0 * 1e200 * updates[1].factors[name].B, updates[1].factors[name].A, 4)[0]
        assert torch.isfinite(g.B).all() and rel_err(g.B, want_B) < 1e-14
