"""methods.md §3 item 16 and §4: 200 rounds of partial participation, in float64.

Each client keeps its own base (``ClientState``, as a Flower node does) and brings it up to date
from its plans alone; the server's state, checkpoint and catch-up messages stay bounded, and the
global model equals a dense float64 reference built round by round from the same updates.
"""

import json

import numpy as np
import pytest
import torch

from fedlora.methods import Setup, build_method
from fedlora.methods.base import plan_nbytes
from fedlora.methods.state import state_dict
from fedlora.ops.lowrank import Dense, pad
from fedlora.ops.weights import data_weights
from fedlora.train.client import ClientState

from tests.conftest import random_update, rel_err

LAYERS = {"q": (24, 16), "v": (8, 16)}
CLIENTS = 20
RANKS = {k: (4, 2, 2, 1)[k % 4] for k in range(CLIENTS)}
SCALES = {k: 2.0 for k in range(CLIENTS)}
ROUNDS = 200
DENSE_BYTES = 8 * sum(o * i for o, i in LAYERS.values())  # every adapted layer as a float64 matrix


def _schedule(seed: int = 0) -> list[list[int]]:
    """2 of 20 clients a round (10 %); client 0 takes part in rounds 10 and 160 only (absent for 150 rounds)."""
    rng = np.random.default_rng(seed)
    rounds = []
    for t in range(1, ROUNDS + 1):
        pick = sorted(int(k) for k in rng.choice(np.arange(1, CLIENTS), size=2, replace=False))
        rounds.append(sorted([0, pick[0]]) if t in (10, 160) else pick)
    return rounds


def _ideal(name: str, updates, weights) -> dict[str, torch.Tensor]:
    """The round's merge by the method's definition, formed densely (methods.md §1)."""
    out = {}
    for layer in LAYERS:
        fs = [u.factors[layer] for u in updates]
        if name == "flora":
            out[layer] = sum(p * u.scale * f.B @ f.A for p, u, f in zip(weights, updates, fs))
        else:
            padded = [pad(u.scale * f.B, f.A, 4) for u, f in zip(updates, fs)]
            out[layer] = sum(p * B for p, (B, _) in zip(weights, padded)) @ sum(p * A for p, (_, A) in zip(weights, padded))
    return out


def _dense(delta) -> dict[str, torch.Tensor]:
    return {n: sum(t.dense() for t in terms) for n, terms in delta.items()}


@pytest.mark.parametrize("name", ["flora", "zeropad"])
def test_200_rounds_of_partial_participation_stay_exact_and_bounded(name, gen):
    m = build_method(name, Setup(LAYERS, RANKS, SCALES, seed=0, dtype=torch.float64))
    clients = {k: ClientState() for k in range(CLIENTS)}
    reference = {n: torch.zeros(s, dtype=torch.float64) for n, s in LAYERS.items()}
    state_bytes, checkpoint_bytes, json_bytes = {}, {}, {}
    for t, sampled in enumerate(_schedule(), start=1):
        plans = {k: m.plan(k, t) for k in sampled}
        for k, plan in plans.items():
            assert plan_nbytes(plan) <= DENSE_BYTES, f"round {t}: catch-up of client {k} larger than the layers"
            clients[k].catch_up(plan)
            assert clients[k].version == t - 1
            for n, terms in clients[k].layers.items():  # the client's base has the server's bits
                mine, server = terms, m.base_delta()[n]
                assert len(mine) == len(server) and all(
                    all(x.equal(y) for x, y in zip(a.tensors(), b.tensors())) for a, b in zip(mine, server)
                ), f"round {t}, client {k}, layer {n}"
        updates = [random_update(k, LAYERS, RANKS[k], SCALES[k], 5 + 3 * k, gen) for k in sampled]
        weights = data_weights([u.num_examples for u in updates])
        m.aggregate(updates, weights, t)
        for n, d in _ideal(name, updates, weights).items():
            reference[n] += d
        state_bytes[t] = m.merged.nbytes()
        tensors, meta = state_dict(m)
        checkpoint_bytes[t] = sum(x.numel() * x.element_size() for x in tensors.values())
        json_bytes[t] = len(json.dumps(meta))
        if t == 160:  # client 0 was away since round 10: a reset, exact
            assert plans[0].base.since == 9 and set(plans[0].base.reset) == set(LAYERS)

    got = _dense(m.global_delta())
    for n in LAYERS:
        assert rel_err(got[n], reference[n]) < 1e-12, n
        assert len(m.global_delta()[n]) == 1 and isinstance(m.global_delta()[n][0], Dense)  # rank would exceed the width
    assert max(state_bytes.values()) <= 2 * DENSE_BYTES  # T_t plus recent merges cheaper than a reset
    assert state_bytes[ROUNDS] <= max(state_bytes[t] for t in range(1, 11))
    assert checkpoint_bytes[ROUNDS] <= max(checkpoint_bytes[t] for t in range(1, 11))
    assert json_bytes[ROUNDS] <= max(json_bytes[t] for t in range(1, 11)) + 40 * CLIENTS  # one version per client, no per-round entry


def test_a_client_back_after_150_rounds_gets_the_cheaper_exact_message(gen):
    """The server keeps only merges cheaper than a reset, so the one returning client gets G_t − W_0 itself."""
    m = build_method("flora", Setup(LAYERS, RANKS, SCALES, seed=0, dtype=torch.float64))
    late = ClientState()
    for t, sampled in enumerate(_schedule(), start=1):
        if t == 160:
            plan = m.plan(0, t)
            assert plan_nbytes(plan) == DENSE_BYTES  # each layer's whole delta, dense: cheaper than 150 merges
            late.catch_up(plan)
            for n in LAYERS:
                assert late.layers[n][0].W.equal(m.base_delta()[n][0].W)
            return
        if t == 10:
            late.catch_up(m.plan(0, t))
        updates = [random_update(k, LAYERS, RANKS[k], SCALES[k], 10, gen) for k in sampled]
        m.aggregate(updates, data_weights([10] * len(updates)), t)


def test_recent_merges_serve_a_short_absence(gen):
    """Wide layers keep the low-rank merges: a client back after two rounds gets exactly those two."""
    layers = {"w": (64, 48)}
    m = build_method("flora", Setup(layers, {0: 2, 1: 2, 2: 2}, {0: 2.0, 1: 2.0, 2: 2.0}, dtype=torch.float64))
    for t, sampled in enumerate([(0, 1), (1, 2), (1, 2)], start=1):
        updates = [random_update(k, layers, 2, 2.0, 10, gen) for k in sampled]
        m.aggregate(updates, data_weights([10] * len(updates)), t)
    plan = m.plan(0, 4)  # client 0 trained in round 1 on version 0
    assert (plan.base.since, plan.base.version) == (0, 3) and set(plan.base.reset) == {"w"}  # version 0: the whole delta
    plan = m.plan(2, 4)  # trained in round 3 on version 2: one merge
    assert (plan.base.since, plan.base.version) == (2, 3) and [t.rank for t in plan.base.merges["w"]] == [4]
    assert plan_nbytes(plan) == 8 * 4 * (64 + 48)
