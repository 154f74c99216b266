"""Property tests of every aggregator on random shapes, ranks, scales and weights (hypothesis, float64).

For each registered method: the server accepts every well-formed update (the validator rejects
none), the new global model is the method's formula of the updates, and its state survives the
checkpoint round trip (pack → unpack) with the same global model and the same next plans.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.methods import REGISTRY, Setup, build_method
from fedlora.methods.base import ClientUpdate, Factors, Method, client_finish, client_prepare
from fedlora.methods.state import load_state_dict, state_dict
from fedlora.methods.validate import Bounds, check_update
from fedlora.ops.weights import data_weights
from fedlora.federation.round import bounds_of

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def federations(draw):
    layers = {f"l{i}": (draw(st.integers(1, 7)), draw(st.integers(1, 7))) for i in range(draw(st.integers(1, 2)))}
    smallest = min(min(s) for s in layers.values())
    K = draw(st.integers(1, 4))
    ranks = {k: draw(st.integers(1, smallest)) for k in range(K)}
    scales = {k: draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])) for k in range(K)}
    n = [draw(st.integers(0, 40)) for _ in range(K)]
    return layers, ranks, scales, n, draw(st.integers(0, 2**16))


def _build(name, layers, ranks, scales):
    """The method at the drawn ranks and scales where it declares it accepts them (``ranks``, ``scales``), else at one rank or one scale."""
    cls = REGISTRY[name]
    r = ranks if cls.ranks == "any" else {k: 1 for k in ranks}
    s = scales if cls.scales == "any" else {k: 2.0 for k in ranks}
    return build_method(name, Setup(layers, r, s, seed=0, dtype=torch.float64))


def _updates(method, n, gen, rnd=1):
    clients = [0] if method.pooled else list(method.setup.ranks)
    plans, updates = {}, []
    for k in clients:
        plan = client_prepare(method, method.plan(k, rnd))
        factors = {}
        for name, (d_out, d_in) in method.setup.layers.items():
            r = plan.rank_pattern.get(name, plan.rank)
            A = plan.init[name].A.clone() if not plan.train_A else torch.randn(r, d_in, generator=gen, dtype=torch.float64)
            factors[name] = Factors(B=torch.randn(d_out, r, generator=gen, dtype=torch.float64), A=A)
        update = client_finish(method, plan, ClientUpdate(k, n[k], plan.scale, factors))
        plans[k] = plan
        updates.append(update)
    return plans, updates


def _dense(delta) -> dict[str, torch.Tensor]:
    return {n: sum(t.dense().double() for t in terms) if terms else None for n, terms in delta.items()}


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    return float(torch.linalg.norm(x - y)) <= 1e-10 * max(1.0, float(torch.linalg.norm(y)))


def test_every_registered_method_brings_a_reference_formula():
    """``Method.reference`` is the method's formula from the specification (methods/reference.py or its own)."""
    missing = sorted(n for n, cls in REGISTRY.items() if cls.reference is Method.reference)
    assert not missing, f"no reference formula for {missing}"


def _expected(method, updates, w) -> dict[str, torch.Tensor]:
    """The method's formula, densified (methods.md §1)."""
    out = {}
    for layer in method.setup.layers:
        want = method.reference(layer, [u.factors[layer] for u in updates], [u.scale for u in updates], w)
        if want is not None:
            out[layer] = want
    return out


@pytest.mark.parametrize("name", sorted(REGISTRY))
@SETTINGS
@given(fed=federations())
def test_every_aggregator_accepts_valid_updates_follows_its_formula_and_round_trips(fed, name):
    layers, ranks, scales, n, seed = fed
    gen = torch.Generator().manual_seed(seed)
    method = _build(name, layers, ranks, scales)
    plans, updates = _updates(method, n, gen)
    bounds = bounds_of(method, 1e6)
    assert all(check_update(u, plans[u.client], bounds) is None for u in updates)
    p = data_weights([u.num_examples for u in updates])
    assert all(x >= 0 for x in p) and math.isclose(sum(p), 1.0)
    w = method.aggregate(updates, p, 1)  # the weights as the method applied them (HetLoRA's norms, uniform, ...)
    assert (not w or math.isclose(sum(w), 1.0)) and all(x >= 0 for x in w)  # empty: the method averages nothing (local)
    got = _dense(method.global_delta())
    for layer, want in _expected(method, updates, w).items():
        assert _close(got[layer], want), (name, layer)
    if name == "fedplora":  # per module: the mean over the clients that trained it; untrained ones unchanged
        for layer, g in method.factors.items():
            for j in range(method.R):
                trained = [(u, (u.meta["indices"] == j).nonzero().flatten()) for u in updates if bool((u.meta["indices"] == j).any())]
                if trained:
                    mean = sum(u.factors[layer].B[:, i].squeeze(-1) for u, i in trained) / len(trained)
                    assert _close(g.B[:, j], mean)
    if name == "local":
        for u in updates:
            want = u.scale * u.factors[next(iter(layers))].B @ u.factors[next(iter(layers))].A
            assert _close(_dense(method.client_delta(u.client))[next(iter(layers))], want)

    tensors, meta = state_dict(method)
    meta = json.loads(json.dumps(meta))  # as a checkpoint stores it
    fresh = _build(name, layers, ranks, scales)
    load_state_dict(fresh, {k: v.clone() for k, v in tensors.items()}, meta)
    assert _same_delta(fresh.global_delta(), method.global_delta())
    for k in plans:
        a, b = fresh.plan(k, 2), method.plan(k, 2)
        assert a.rank == b.rank and _same_factors(a.init, b.init) and _same_base(a.base, b.base)


def _same_base(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (a.since, a.version) == (b.since, b.version) and _same_delta(a.merges, b.merges) and _same_delta(a.reset, b.reset)


def _same_delta(a, b) -> bool:
    return a.keys() == b.keys() and all(
        len(a[n]) == len(b[n]) and all(len(x.tensors()) == len(y.tensors()) and all(p.equal(q) for p, q in zip(x.tensors(), y.tensors())) for x, y in zip(a[n], b[n]))
        for n in a
    )


def _same_factors(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(a[n].B.equal(b[n].B) and a[n].A.equal(b[n].A) for n in a)


def test_bounds_reject_nothing_a_method_may_legitimately_send():
    """HETLoRA may send a pruned rank, down to r_min; every other method exactly its plan's rank."""
    het = _build("hetlora", {"l": (6, 5)}, {0: 3}, {0: 2.0})
    assert bounds_of(het, 1.0).min_rank == 1 and bounds_of(_build("flora", {"l": (6, 5)}, {0: 3}, {0: 2.0}), 1.0).min_rank is None
    assert Bounds({"l": (6, 5)}, 1.0).modules is None
