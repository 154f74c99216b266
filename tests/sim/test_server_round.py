"""The server folds replies in as they arrive: same aggregate as the batch formula, nothing held (float64)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fedlora.methods import REGISTRY, Setup, build_method
from fedlora.methods.base import as_received
from fedlora.ops.weights import data_weights
from fedlora.federation.round import Arrival, ServerRound, bounds_of
from fedlora.train.client import ClientState, start_delta
from tests.conftest import random_update, rel_err
from tests.dense_reference import dense, dense_agg_noise

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 10)}
FOLDING = ["flora", "zeropad", "fedit", "ffa", "full"]


def _setup(name: str, n: int, layers=LAYERS) -> Setup:
    ranks = {k: (2 if REGISTRY[name].ranks == "one" else 1 + k % 3) for k in range(n)}
    if name == "full":
        ranks = {k: 10 for k in range(n)}
    return Setup(layers, ranks, {k: (1.0 if name == "full" else 2.0) for k in range(n)}, seed=0, dtype=torch.float64)


def _replies(method, rnd, gen, counts, layers=LAYERS):
    """Each client's plan as prepared, a random trained update of the plan's rank, its start."""
    out = []
    for k, n in enumerate(counts):
        sent = method.plan(k, rnd)
        plan = method.client_prepare(sent)
        state = ClientState()
        state.catch_up(sent)
        update = as_received(random_update(k, layers, plan.rank, plan.scale, n, gen), plan, layers)  # a frozen A comes back as sent
        out.append(Arrival(sent, plan, update, start_delta(state, plan)))
    return out


@pytest.mark.parametrize("name", FOLDING)
def test_folding_reply_by_reply_equals_the_batch_aggregate(name, gen):
    counts = [30, 10, 0, 25, 5]
    streamed, batch = build_method(name, _setup(name, 5)), build_method(name, _setup(name, 5))
    assert streamed.folds
    replies = _replies(streamed, 1, gen, counts)
    server = ServerRound(streamed, bounds_of(streamed, 1e6), 1, name, list(range(5)), 1, streamed.global_delta())
    for a in replies:
        server.receive(a)
    assert server.seam.replies == []  # a folding method keeps no update
    entry = server.finish(lambda *_: None)
    before = batch.global_delta()
    batch.aggregate([a.update for a in replies], data_weights(counts), 1)
    for layer in LAYERS:
        assert rel_err(dense(streamed.global_delta(), layer, LAYERS), dense(batch.global_delta(), layer, LAYERS)) < 1e-12
    assert entry["weights"] == data_weights(counts) and len(entry["clients"]) == 5
    want = dense_agg_noise(before, batch.global_delta(), [a.start for a in replies], [a.update for a in replies], data_weights(counts), LAYERS)
    assert abs(entry["agg_noise"] - want) <= 1e-10 * want + 1e-12  # exact methods: both at float64 round-off


def test_flora_over_many_clients_on_a_small_layer_stays_exact_and_holds_no_upload(gen):
    """60 clients of rank 1–3 on 6 × 10 and 12 × 10 layers: the stacks are compressed as they grow."""
    n = 60
    counts = [5 + k % 7 for k in range(n)]
    method = build_method("flora", _setup("flora", n))
    replies = _replies(method, 1, gen, counts)
    first_B = weakref.ref(replies[0].update.factors["l0.v"].B)
    updates = [a.update for a in replies]
    ideal = {layer: sum(p * u.scale * u.factors[layer].B @ u.factors[layer].A for u, p in zip(updates, data_weights(counts))) for layer in LAYERS}
    server = ServerRound(method, bounds_of(method, 1e6), 1, "flora", list(range(n)), 1, method.global_delta())
    for a in replies:
        server.receive(a)
    del replies, updates, a
    gc.collect()
    assert first_B() is None  # folded, compressed and dropped: the server no longer holds client 0's upload
    entry = server.finish(lambda *_: None)
    for layer, (d_out, d_in) in LAYERS.items():
        (merged,) = method.global_delta()[layer]
        assert merged.rank <= min(d_out, d_in)
        assert rel_err(merged.dense(), ideal[layer]) < 1e-12
    assert entry["agg_noise"] < 1e-12


@pytest.mark.parametrize("name", ["fedit", "zeropad"])
def test_streamed_agg_noise_matches_the_dense_definition_past_the_layer_rank(name, gen):
    """Enough clients that the ideal is summed densely: the noise still equals §2 computed naively."""
    n = 12
    counts = [3 + k for k in range(n)]
    method = build_method(name, _setup(name, n))
    before = method.global_delta()
    replies = _replies(method, 1, gen, counts)
    server = ServerRound(method, bounds_of(method, 1e6), 1, name, list(range(n)), 1, before)
    for a in replies:
        server.receive(a)
    assert server.ideal is not None and set(server.ideal.dense) == set(LAYERS)  # the dense path was taken
    entry = server.finish(lambda *_: None)
    want = dense_agg_noise(before, method.global_delta(), [a.start for a in replies], [a.update for a in replies], data_weights(counts), LAYERS)
    assert entry["agg_noise"] > 1e-3
    assert abs(entry["agg_noise"] - want) < 1e-10 * want


@pytest.mark.parametrize("name", ["flora", "fedit"])
def test_every_count_zero_weighs_the_clients_uniformly(name, gen):
    counts = [0, 0, 0]
    streamed, batch = build_method(name, _setup(name, 3)), build_method(name, _setup(name, 3))
    replies = _replies(streamed, 1, gen, counts)
    server = ServerRound(streamed, bounds_of(streamed, 1e6), 1, name, [0, 1, 2], 1, streamed.global_delta())
    for a in replies:
        server.receive(a)
    entry = server.finish(lambda *_: None)
    batch.aggregate([a.update for a in replies], [1 / 3] * 3, 1)
    assert entry["weights"] == [1 / 3] * 3
    for layer in LAYERS:
        assert rel_err(dense(streamed.global_delta(), layer, LAYERS), dense(batch.global_delta(), layer, LAYERS)) < 1e-12


def test_personal_scores_are_averaged_in_client_order_whatever_order_they_arrived_in():
    """A float sum depends on its order: three losses whose sum rounds differently in two orders."""
    from fedlora.federation.server import personal_eval

    losses = {0: 5.956104206589033, 1: 5.949246920072115, 2: 1e-16 + 5.952838100282486}
    orders = [[0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]]
    means = {personal_eval({k: {"global": {"loss": losses[k]}, "test": {"loss": 0.0}} for k in order})["global"]["loss"] for order in orders}
    assert means == {sum(losses[k] for k in (0, 1, 2)) / 3}
