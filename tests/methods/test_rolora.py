"""methods.md §3 item 14 for RoLoRA, in float64: B rounds train and average only B (every client's
A is the global A before and after), A rounds only A; each round's aggregate is exact; each
direction carries one factor."""

import pytest
import torch

from fedlora.federation.round import Arrival, bounds_of, finish_round, start_of
from fedlora.flower.records import records_to_update, update_to_records
from fedlora.methods import Setup
from fedlora.methods.base import ClientUpdate, Factors, plan_nbytes, update_nbytes
from fedlora.methods.rolora import RoLoRA

from tests.conftest import rel_err

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 9)}
N, R, S = 4, 3, 2.0
D_OUT, D_IN = sum(o for o, _ in LAYERS.values()), sum(i for _, i in LAYERS.values())


def _rolora() -> RoLoRA:
    return RoLoRA(Setup(LAYERS, {k: R for k in range(N)}, {k: S for k in range(N)}, seed=2, dtype=torch.float64))


def _train(plan, gen) -> ClientUpdate:
    """The factor that trains moves; the frozen one comes back as it was sent (PEFT freezes it)."""
    factors = {}
    for n, f in plan.init.items():
        B = f.B + torch.randn(f.B.shape, generator=gen, dtype=torch.float64) if plan.train_B else f.B.clone()
        A = f.A + torch.randn(f.A.shape, generator=gen, dtype=torch.float64) if plan.train_A else f.A.clone()
        factors[n] = Factors(B, A)
    return ClientUpdate(client=plan.client, num_examples=1 + 2 * plan.client, scale=S, factors=factors)


def test_rounds_alternate_b_first_and_each_average_is_exact(gen):
    m = _rolora()
    assert all(not f.B.any() for f in m.factors.values())  # B starts at 0: an A round first would have no gradient
    for rnd, clients in enumerate([(0, 1, 2), (1, 3), (0, 2, 3), (3,), (0, 1, 2, 3)], start=1):
        old = {n: Factors(f.B.clone(), f.A.clone()) for n, f in m.factors.items()}
        plans = [m.plan(k, rnd) for k in clients]
        b_round = rnd % 2 == 1
        assert all(p.train_B == b_round and p.train_A == (not b_round) and p.upload == ("B" if b_round else "A") for p in plans)
        updates = [_train(p, gen) for p in plans]
        arrivals = [Arrival(p, p, u, start_of(m, p)) for p, u in zip(plans, updates)]
        entry = finish_round(m, bounds_of(m, 1e9), rnd, "rolora", list(clients), 1, m.global_delta(), arrivals, lambda *a: None)
        n = [u.num_examples for u in updates]
        p = [x / sum(n) for x in n]
        for name in LAYERS:
            frozen, trained = ("A", "B") if b_round else ("B", "A")
            assert torch.equal(getattr(m.factors[name], frozen), getattr(old[name], frozen))  # the frozen factor: unchanged, bit for bit
            assert all(torch.equal(getattr(u.factors[name], frozen), getattr(old[name], frozen)) for u in updates)
            mean = sum(pk * getattr(u.factors[name], trained) for pk, u in zip(p, updates))
            assert rel_err(getattr(m.factors[name], trained), mean) < 1e-14
            exact = sum(pk * S * u.factors[name].B @ u.factors[name].A for pk, u in zip(p, updates))
            assert rel_err(S * m.factors[name].B @ m.factors[name].A, exact) < 1e-12
        assert entry["agg_noise"] < 1e-12 and entry["init_noise"] < 1e-12  # clients resume from the global factors


@pytest.mark.parametrize("rnd", [1, 2])
def test_each_direction_sends_one_factor(gen, rnd):
    m = _rolora()
    plan = m.plan(1, rnd)
    u = _train(plan, gen)
    assert plan_nbytes(plan) == 8 * R * (D_OUT + D_IN)  # down: both factors
    assert update_nbytes(u, plan.upload) == 8 * R * (D_OUT if rnd == 1 else D_IN)
    back = records_to_update(update_to_records(u, upload=plan.upload, wire="float32"), plan, LAYERS)
    frozen = "A" if rnd == 1 else "B"
    assert all(torch.equal(getattr(back.factors[n], frozen), getattr(plan.init[n], frozen).float()) for n in LAYERS)  # the receiver's own copy
