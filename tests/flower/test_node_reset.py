"""A node that dropped its damaged base is brought back from W_0 by a reset, exactly (float64)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fedlora.federation.server import Server
from fedlora.methods import Setup, build_method
from fedlora.ops.lowrank import fold_terms
from fedlora.ops.weights import data_weights
from fedlora.train.client import ClientState, start_delta

from tests.conftest import random_update, rel_err

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 10)}
RANKS = {0: 4, 1: 2}


def test_a_dropped_base_gets_a_reset_from_version_0_that_reaches_the_global_base(gen):
    method = build_method("flora", Setup(LAYERS, RANKS, {0: 2.0, 1: 1.0}, seed=0, dtype=torch.float64))
    server = SimpleNamespace(method=method)
    node = ClientState()
    for rnd in (1, 2, 3):
        node.catch_up(method.plan(0, rnd))
        updates = [random_update(k, LAYERS, RANKS[k], 1.0, 10 + k, gen) for k in RANKS]
        method.aggregate(updates, data_weights([u.num_examples for u in updates]), rnd)
    assert method.plan(0, 4).base.since == 2  # an ordinary plan: only what the node missed since its version
    Server.base_dropped(server, 0)  # the node's base failed its checksum and was dropped
    plan = method.plan(0, 4)
    assert plan.base.since == 0 and set(plan.base.reset) == set(LAYERS) and not plan.base.merges
    fresh = ClientState()  # at W_0, as the node is after dropping its state
    fresh.catch_up(plan)
    w0 = {n: torch.zeros(s, dtype=torch.float64) for n, s in LAYERS.items()}
    got = {n: fold_terms(t, w0[n]) for n, t in start_delta(fresh, plan).items()}
    want = {n: fold_terms(t, w0[n]) for n, t in method.global_delta().items()}
    assert all(rel_err(got[n], want[n]) < 1e-13 for n in LAYERS)
