"""methods.md §3 item 12 for FedSA-LoRA, in float64: Ā is the weighted mean of the A_k; every
client's B_k is bit-identical to what it trained the last round it took part in; no B is ever in
an uplink or downlink (the byte counters and the Flower records prove it)."""

import pytest
import torch

from fedlora.federation.round import Arrival, bounds_of, finish_round, start_of
from fedlora.flower.records import plan_to_records, update_to_records
from fedlora.methods import MethodError, Setup
from fedlora.methods.base import ClientUpdate, Factors, as_received, plan_nbytes, update_nbytes
from fedlora.methods.fedsa import FedSA
from fedlora.methods.state import load_state_dict, state_dict

from tests.conftest import rel_err

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 9)}
N, R = 5, 3


def _fedsa(**options) -> FedSA:
    return FedSA(Setup(LAYERS, {k: R for k in range(N)}, {k: 2.0 for k in range(N)}, seed=4, dtype=torch.float64, options=options))


def _train(plan, gen) -> ClientUpdate:
    """Both factors move from where the client started: its own B_k and the shared Ā."""
    factors = {n: Factors(f.B + torch.randn(f.B.shape, generator=gen, dtype=torch.float64), f.A + 0.1 * torch.randn(f.A.shape, generator=gen, dtype=torch.float64))
               for n, f in plan.init.items()}
    return ClientUpdate(client=plan.client, num_examples=3 + 4 * plan.client, scale=plan.scale, factors=factors)


def _round(m, clients, kept, gen, rnd, client_side=None):
    """One round as the transports run it: plan → client_start(kept) → train → keep → the server's view."""
    client_side = client_side or m
    arrivals, trained = [], {}
    for k in clients:
        sent = m.plan(k, rnd)
        plan = client_side.client_start(client_side.client_prepare(sent), kept.get(k))
        u = client_side.client_finish(plan, _train(plan, gen))
        kept[k] = client_side.client_keep(plan, u)
        trained[k] = (plan, u)
        arrivals.append(Arrival(sent, plan, u, start_of(m, plan)))
    entry = finish_round(m, bounds_of(m, 1e9), rnd, "fedsa", list(clients), 1, m.global_delta(), arrivals, lambda *a: None)
    return trained, entry


@pytest.mark.parametrize("weights", ["data", "uniform"])
def test_shared_A_is_the_weighted_mean_of_the_clients_A(gen, weights):
    m = _fedsa(weights=weights)
    trained, entry = _round(m, (0, 2, 3), {}, gen, 1)
    n = {k: u.num_examples for k, (_, u) in trained.items()}
    p = {k: (n[k] / sum(n.values()) if weights == "data" else 1 / 3) for k in n}
    for name in LAYERS:
        want = sum(p[k] * u.factors[name].A for k, (_, u) in trained.items())
        assert rel_err(m.A[name], want) < 1e-14
    assert entry["weights"] == pytest.approx([p[k] for k in (0, 2, 3)], rel=1e-14)
    assert entry["agg_noise"] is None and entry["init_noise"] is None  # no global model to measure against


def test_every_client_starts_from_its_own_last_B_and_the_current_A(gen):
    m, kept, last = _fedsa(), {}, {}
    client_process = _fedsa()  # a client builds its own method object (as a SuperNode does)
    for rnd, clients in enumerate([(0, 1), (1, 2, 3), (0, 3), (2,), (0, 1, 2, 3)], start=1):
        starts = {k: client_process.client_start(client_process.client_prepare(m.plan(k, rnd)), kept.get(k)) for k in clients}
        for k, plan in starts.items():
            for name, (d_out, _) in LAYERS.items():
                B = plan.init[name].B
                assert torch.equal(B, last[k][name]) if k in last else torch.equal(B, torch.zeros(d_out, R, dtype=torch.float64))
                assert torch.equal(plan.init[name].A, m.A[name])
        trained, _ = _round(m, clients, kept, gen, rnd, client_process)
        for k, (_, u) in trained.items():
            last[k] = {name: u.factors[name].B.clone() for name in LAYERS}
    assert 4 not in kept  # client 4 never took part: it keeps nothing and its model is W_0 + s·0·Ā


def test_no_B_crosses_a_wire(gen):
    m, kept = _fedsa(), {}
    d_in = sum(i for _, i in LAYERS.values())
    for rnd in (1, 2):
        sent = m.plan(1, rnd)
        assert sent.upload == "A" and sent.keep_B and sent.init is None
        assert plan_nbytes(sent) == 8 * R * d_in  # Ā only (float64 here)
        keys = [k for rec in plan_to_records(sent).array_records.values() for k in rec]
        assert keys and not any(k.endswith("/B") for k in keys), keys
        plan = m.client_start(m.client_prepare(sent), kept.get(1))
        u = _train(plan, gen)
        kept[1] = m.client_keep(plan, u)
        assert update_nbytes(u, plan.upload) == 8 * R * d_in
        up = update_to_records(u, upload=plan.upload)
        assert sorted(up.array_records["update.arrays"]) == sorted(f"factors/{n}/A" for n in LAYERS)
        seen = as_received(u, plan, LAYERS)  # the server's view: the A_k, and a zero placeholder for B
        assert all(torch.equal(seen.factors[n].A, u.factors[n].A) and not seen.factors[n].B.any() for n in LAYERS)
        _, entry = _round(m, (1,), kept, gen, rnd)
        assert entry["bytes_up"] == entry["bytes_down"] == 8 * R * d_in


def test_state_round_trips_and_the_rank_must_be_one(gen):
    m = _fedsa()
    _round(m, (0, 1), {}, gen, 1)
    tensors, meta = state_dict(m)
    back = _fedsa()
    load_state_dict(back, tensors, meta)
    assert all(torch.equal(back.A[n], m.A[n]) for n in LAYERS)
    with pytest.raises(MethodError, match=r"'fedsa' needs one rank for every client.*heterogeneous method: flora"):
        FedSA(Setup(LAYERS, {0: 2, 1: 4}, {0: 2.0, 1: 2.0}))
