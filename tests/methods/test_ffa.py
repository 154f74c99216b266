"""methods.md §3 items 10 and 11 for FFA-LoRA, and its §2 diagnostics, in float64."""

import math

import pytest
import torch

from fedlora.methods import MethodError, Setup
from fedlora.methods.base import ClientUpdate, Factors, client_prepare, plan_nbytes, update_nbytes
from fedlora.methods.ffa import FFALoRA
from fedlora.ops.weights import data_weights
from fedlora.federation.diagnostics import agg_noise, init_noise
from fedlora.train.client import ClientState, start_delta

from tests.conftest import rel_err

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 10), "l1.q": (12, 10)}
N = 4
D_OUT = sum(o for o, _ in LAYERS.values())


def _ffa(rank=3, scale=2.0, seed=7, dtype=torch.float64, **kw) -> FFALoRA:
    return FFALoRA(Setup(LAYERS, {k: rank for k in range(N)}, {k: scale for k in range(N)}, seed=seed, dtype=dtype, **kw))


def _trained(plan, n, gen) -> ClientUpdate:
    """A client's result: B moved by a random step from B̄, A the frozen one it was given."""
    factors = {
        name: Factors(B=f.B + torch.randn(f.B.shape, generator=gen, dtype=torch.float64), A=f.A.clone()) for name, f in plan.init.items()
    }
    return ClientUpdate(client=plan.client, num_examples=n, scale=plan.scale, factors=factors)


def _round(m, clients, gen, rnd):
    plans = [client_prepare(m, m.plan(k, rnd)) for k in clients]
    updates = [_trained(p, 5 + 11 * p.client, gen) for p in plans]
    w = data_weights([u.num_examples for u in updates])
    m.aggregate(updates, w, rnd)
    return plans, updates, w


def test_A_is_shared_by_clients_and_rounds_and_frozen(gen):
    m = _ffa()
    first = {n: A.clone() for n, A in m.A.items()}
    for rnd, clients in enumerate([(0, 1, 2), (1, 3), (0, 3)], start=1):
        plans, _, _ = _round(m, clients, gen, rnd)
        for p in plans:
            assert not p.train_A
            for name, f in p.init.items():
                assert torch.equal(f.A, first[name])
    assert all(torch.equal(m.A[n], first[n]) for n in LAYERS)
    # a client process builds its own method from the same setup and regenerates the same A
    other = _ffa()
    assert all(torch.equal(client_prepare(other, m.plan(2, 4)).init[n].A, first[n]) for n in LAYERS)
    # PEFT's Kaiming-uniform bound; the layers get different draws; the seed matters
    assert all(float(A.abs().max()) <= 1 / math.sqrt(LAYERS[n][1]) for n, A in first.items())
    assert not torch.equal(first["l0.q"], first["l1.q"])
    assert not torch.equal(_ffa(seed=8).A["l0.q"], first["l0.q"])


def test_plan_carries_B_bar_and_the_seed_but_no_A(gen):
    m = _ffa()
    sent = m.plan(0, 1)
    assert sent.init is None and not sent.train_A
    assert sent.meta["A_seed"].dtype == torch.int64 and sent.meta["A_seed"].numel() == 1
    plan = client_prepare(m, sent)
    assert plan.rank == 3 and plan.scale == 2.0 and not plan.train_A
    for name, (d_out, d_in) in LAYERS.items():
        assert plan.init[name].B.shape == (d_out, 3) and plan.init[name].A.shape == (3, d_in)
        assert torch.count_nonzero(plan.init[name].B) == 0  # round 1: B̄ = 0
    _round(m, (0, 1), gen, 1)
    plan = client_prepare(m, m.plan(3, 2))
    for name in LAYERS:
        assert torch.equal(plan.init[name].B, m.B[name])


@pytest.mark.parametrize("dtype,size", [(torch.float64, 8), (torch.float32, 4)])
def test_byte_counts_follow_the_table(gen, dtype, size):
    m = _ffa(dtype=dtype)
    assert plan_nbytes(m.plan(0, 1)) == size * 3 * D_OUT + 8  # r·d_out even while B̄ = 0, plus the int64 seed
    plans, updates, _ = _round(m, (0, 1), gen, 1)
    assert plan_nbytes(m.plan(2, 2)) == size * 3 * D_OUT + 8  # nothing accumulates for a skipped client
    for p, u in zip(plans, updates):
        assert update_nbytes(u, p.upload) == 8 * 3 * D_OUT  # B only (the test's updates are float64)


def test_aggregation_is_exact_and_depends_on_every_client(gen):
    m = _ffa(scale=1.5)
    _, updates, w = _round(m, (0, 1, 2), gen, 1)
    for name in LAYERS:
        B_bar = sum(p * u.factors[name].B for u, p in zip(updates, w))
        assert rel_err(m.B[name], B_bar) < 1e-14
        ideal = sum(p * u.scale * u.factors[name].B @ u.factors[name].A for u, p in zip(updates, w))
        (g,) = m.global_delta()[name]
        assert rel_err(g.dense(), ideal) < 1e-13
    for k in range(3):
        changed = [
            ClientUpdate(u.client, u.num_examples, u.scale, {n: Factors(f.B + (i == k), f.A) for n, f in u.factors.items()})
            for i, u in enumerate(updates)
        ]
        m2 = _ffa(scale=1.5)
        m2.aggregate(changed, w, 1)
        assert rel_err(m2.B["l0.q"], m.B["l0.q"]) > 1e-3


def test_per_layer_ranks_shared_by_all_clients_work(gen):
    m = _ffa(rank_patterns={"v": {k: 5 for k in range(N)}})
    plan = client_prepare(m, m.plan(1, 1))
    assert plan.rank == 3 and plan.rank_pattern == {"l0.v": 5}
    assert plan.init["l0.v"].A.shape == (5, 10) and plan.init["l0.q"].A.shape == (3, 10)
    assert plan_nbytes(m.plan(1, 1)) == 8 * (3 * 24 + 5 * 6) + 8


def test_heterogeneous_setups_are_refused_with_alternatives():
    with pytest.raises(MethodError, match=r"^federation\.method: 'ffa' needs one rank.*lora\.ranks=\[4, 2\].*zeropad"):
        FFALoRA(Setup(LAYERS, {0: 4, 1: 2}, {0: 2.0, 1: 2.0}))
    with pytest.raises(MethodError, match=r"^federation\.method: 'ffa' needs one lora\.scale.*\[2\.0, 1\.0\]"):
        FFALoRA(Setup(LAYERS, {0: 4, 1: 4}, {0: 2.0, 1: 1.0}))
    with pytest.raises(MethodError, match=r"^lora\.rank_patterns: 'ffa'.*\[2, 5\] on l0\.v.*flora"):
        FFALoRA(Setup(LAYERS, {0: 4, 1: 4}, {0: 2.0, 1: 2.0}, rank_patterns={"v": {0: 2, 1: 5}}))
    with pytest.raises(MethodError, match=r"^federation\.options\.weights: unknown option for ffa \(accepted: none\)$"):
        _ffa(options={"weights": "data"})


def test_diagnostics_under_partial_participation(gen):
    m = _ffa()
    states = {k: ClientState() for k in range(N)}
    for rnd, sampled in enumerate([(0, 1, 2), (1, 3), (0, 2, 3)], start=1):
        before = m.global_delta()
        plans = [client_prepare(m, m.plan(k, rnd)) for k in sampled]
        starts, inits = [], []
        for p in plans:
            states[p.client].catch_up(p)
            starts.append(start_delta(states[p.client], p))
            assert starts[-1] == {}  # FFA never touches the frozen base
            inits.append(init_noise(before, starts[-1], p))
        updates = [_trained(p, 5 + 11 * p.client, gen) for p in plans]  # different data: different B_k
        w = data_weights([u.num_examples for u in updates])
        m.aggregate(updates, w, rnd)
        assert all(x is not None and x < 1e-12 for x in inits)  # starts at (B̄, A): the global model
        assert agg_noise(before, m.global_delta(), starts, updates, w) < 1e-12  # exact: A is shared
    # a client whose A drifted would break exactness: the diagnostic sees it
    before = m.global_delta()
    plans = [client_prepare(m, m.plan(k, 4)) for k in (0, 1)]
    updates = [_trained(p, 10, gen) for p in plans]
    updates[1].factors["l0.q"].A.add_(0.1)
    m.aggregate(updates, [0.5, 0.5], 4)
    assert agg_noise(before, m.global_delta(), [{}, {}], updates, [0.5, 0.5]) > 1e-3
