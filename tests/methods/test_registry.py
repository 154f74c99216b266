"""Contract tests run over every registered method (style.md lesson 9)."""

import pytest
import torch

from fedlora.methods import REGISTRY, MethodError, Setup, build_method
from fedlora.methods.base import Factors, as_received, client_finish, client_prepare, plan_nbytes, update_nbytes
from fedlora.ops.weights import data_weights
from fedlora.federation import diagnostics
from fedlora.train.client import ClientState, start_delta

from tests.conftest import random_update

LAYERS = {"l0.q": (10, 8), "l0.v": (6, 8), "l1.q": (10, 8)}
HETERO = {0: 4, 1: 2, 2: 1}
HOMO = {0: 2, 1: 2, 2: 2}


def _setup_for(name):
    """Heterogeneous ranks where the method declares it accepts them (``ranks``), else one rank."""
    ranks = HETERO if REGISTRY[name].ranks == "any" else HOMO
    setup = Setup(LAYERS, ranks, {k: 2.0 for k in ranks}, seed=3, dtype=torch.float64)
    return build_method(name, setup), setup


def _train(plan, gen):
    """A client's result: its initial factors (or fresh ones) plus a random step, at the plan's ranks."""
    factors = {}
    for n, (d_out, d_in) in LAYERS.items():
        r = plan.rank_pattern.get(n, plan.rank)
        init = (plan.init or {}).get(n) or Factors(torch.zeros(d_out, r, dtype=torch.float64), torch.randn(r, d_in, generator=gen, dtype=torch.float64))
        step = random_update(plan.client, {n: (d_out, d_in)}, r, plan.scale, 1, gen).factors[n]
        A = init.A.double() + (0.1 * step.A if plan.train_A else 0)
        factors[n] = Factors(init.B.double() + (0.1 * step.B if plan.train_B else 0), A)
    return factors


def _dense(delta) -> dict[str, list[float]]:
    return {n: sum(t.dense() for t in terms).flatten().tolist() for n, terms in delta.items() if terms}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_runs_rounds_with_partial_participation(name, gen):
    method, setup = _setup_for(name)
    assert method.name == name and isinstance(method.summary, str) and method.summary
    assert isinstance(method.options, dict)
    states = {k: ClientState() for k in setup.ranks}
    kept = {}  # what each client keeps on its side (Method.keeps)
    pooled = method.pooled
    for rnd, sampled in enumerate([(0, 1, 2), (0, 2), (1, 2)], start=1):
        sampled = (0,) if pooled else sampled
        before = method.global_delta()
        updates, starts = [], []
        for k in sampled:
            sent = method.plan(k, rnd)
            assert sent.client == k and sent.round == rnd and plan_nbytes(sent) >= 0
            plan = method.client_start(client_prepare(method, sent), kept.get(k))
            states[k].catch_up(plan)
            starts.append(start_delta(states[k], plan))
            diagnostics.init_noise(before, starts[-1], plan)
            from fedlora.methods.base import ClientUpdate

            update = ClientUpdate(client=k, num_examples=5 + 3 * k, scale=plan.scale, factors=_train(plan, gen))
            update = client_finish(method, plan, update)
            assert update_nbytes(update, plan.upload) > 0
            if (own := method.client_keep(plan, update)) is not None:
                kept[k] = own
            updates.append(as_received(update, plan, LAYERS))
        weights = data_weights([u.num_examples for u in updates])
        assert abs(sum(weights) - 1) < 1e-15 and min(weights) >= 0
        applied = method.aggregate(updates, [u.num_examples for u in updates], rnd)  # counts: the method normalises
        if name == "local":
            assert applied == []  # nothing is averaged
        else:
            assert len(applied) == len(updates) and abs(sum(applied) - 1) < 1e-12
        after = method.global_delta()
        for n, terms in after.items():
            assert n in LAYERS
            for t in terms:
                assert t.shape == LAYERS[n]
        if method.keeps:  # each client's own model, from what it kept and the shared part
            assert all(_dense(method.client_model(method.client_start(client_prepare(method, method.plan(u.client, rnd + 1)), kept[u.client])))
                       for u in updates)
            continue
        if method.personal:
            assert all(method.client_delta(u.client) for u in updates)  # each client's own model exists
            continue
        assert _dense(after) != _dense(before), "the round changed nothing"
        noise = diagnostics.agg_noise(before, after, starts, updates, applied if name != "fedplora" else weights)
        if method.exact:  # declared: the aggregate is Σ p_k (M_k − G_t) exactly
            assert noise < 1e-10, (name, rnd, noise)
        else:
            assert noise > 1e-6, (name, rnd, noise)  # e.g. the product of means is not the mean of products


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_unknown_options_are_refused(name):
    with pytest.raises(MethodError, match=rf"^federation\.options\.bogus: unknown option for {name}"):
        build_method(name, Setup(LAYERS, HOMO, {k: 2.0 for k in HOMO}, options={"bogus": 1}))
