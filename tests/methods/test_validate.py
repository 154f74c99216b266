"""Fuzz test of the update validator: every malformed update is rejected and the global state never changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.methods import Setup, build_method
from fedlora.methods.base import ClientUpdate, Factors
from fedlora.methods.state import pack, state_of
from fedlora.methods.validate import check_update
from fedlora.federation.round import Arrival, RoundFailed, bounds_of, finish_round
from fedlora.train.client import ClientState, start_delta

LAYERS = {"a.q": (6, 5), "a.v": (3, 5)}
RANKS = {0: 3, 1: 2}


def _method(name):
    return build_method(name, Setup(LAYERS, RANKS, {k: 2.0 for k in RANKS}, seed=0, dtype=torch.float64))


def _valid(method, client, gen):
    plan = method.plan(client, 1)
    factors = {n: Factors(torch.randn(d_out, plan.rank, generator=gen, dtype=torch.float64), torch.randn(plan.rank, d_in, generator=gen, dtype=torch.float64))
               for n, (d_out, d_in) in LAYERS.items()}
    meta = {"indices": plan.meta["indices"].clone()} if "indices" in plan.meta else {}
    return plan, ClientUpdate(client, 10, plan.scale, factors, meta=meta)


def _layer(u: ClientUpdate, name: str, B=None, A=None) -> ClientUpdate:
    """``u`` with one layer's factors replaced, bypassing Factors' own shape assertion."""
    f = Factors.__new__(Factors)
    object.__setattr__(f, "B", u.factors[name].B if B is None else B)  # a frozen pair, built around its checks
    object.__setattr__(f, "A", u.factors[name].A if A is None else A)
    return dataclasses.replace(u, factors={**u.factors, name: f})


def _mutations(u: ClientUpdate, draw, indexed: bool, prunes: bool) -> ClientUpdate:
    """One malformation of a valid update; index ones only where the method uses indices."""
    name = draw(st.sampled_from(sorted(LAYERS)))
    f = u.factors[name]
    r, (d_out, d_in) = f.rank, LAYERS[name]
    kinds = ["dtype", "shape_B", "shape_A", "3d", "nan", "inf", "huge", "missing", "extra", "client", "examples", "not_tensor", "scale"]
    kind = draw(st.sampled_from(kinds + (["dup_index", "range_index", "no_index", "float_index"] if indexed else [])))
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8]))
        return _layer(u, name, B=f.B.to(dtype))
    if kind == "shape_B":
        return _layer(u, name, B=torch.zeros(d_out + draw(st.sampled_from([-1, 1])), r, dtype=torch.float64))
    if kind == "shape_A":
        extra = 1 if prunes else draw(st.sampled_from([1, -1]))  # a lower rank is a legitimate pruned upload
        return _layer(u, name, B=torch.zeros(d_out, r + extra, dtype=torch.float64), A=torch.zeros(r + extra, d_in, dtype=torch.float64))
    if kind == "3d":
        return _layer(u, name, A=f.A[None])
    if kind in ("nan", "inf", "huge"):
        value = {"nan": float("nan"), "inf": draw(st.sampled_from([float("inf"), float("-inf")])), "huge": draw(st.floats(1e5, 1e300))}[kind]
        which = draw(st.sampled_from(["B", "A"]))
        t = (f.B if which == "B" else f.A).clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = value
        return _layer(u, name, **{which: t})
    if kind == "missing":
        return dataclasses.replace(u, factors={n: x for n, x in u.factors.items() if n != name})
    if kind == "extra":
        return dataclasses.replace(u, factors={**u.factors, draw(st.text(min_size=1, max_size=8)) + ".x": f})
    if kind == "client":
        return dataclasses.replace(u, client=u.client + draw(st.integers(1, 5)))
    if kind == "examples":
        return dataclasses.replace(u, num_examples=draw(st.sampled_from([-1, 2.5, "10", None, True])))
    if kind == "not_tensor":
        return _layer(u, name, B=f.B.tolist())
    if kind == "scale":
        return dataclasses.replace(u, scale=u.scale * draw(st.sampled_from([0.5, 2.0, -1.0])))
    K = u.meta["indices"]
    if kind == "dup_index":
        bad = K.clone()
        bad[-1] = bad[0]
    elif kind == "range_index":
        bad = K.clone()
        bad[0] = draw(st.sampled_from([-1, 3, 100]))
    elif kind == "no_index":
        return dataclasses.replace(u, meta={})
    else:
        bad = K.to(torch.float32)
    return dataclasses.replace(u, meta={**u.meta, "indices": bad})


@pytest.mark.parametrize("name", ["flora", "fedplora", "hetlora", "zeropad"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**16), client=st.sampled_from(sorted(RANKS)))
def test_every_malformed_update_is_rejected_and_the_state_never_changes(name, data, seed, client):
    method = _method(name)
    gen = torch.Generator().manual_seed(seed)
    plan, good = _valid(method, client, gen)
    bounds = bounds_of(method, 1e4)
    assert check_update(good, plan, bounds) is None
    bad = _mutations(good, data.draw, indexed="indices" in plan.meta, prunes=bounds.min_rank is not None)
    reason = check_update(bad, plan, bounds)
    assert isinstance(reason, str) and reason and "\n" not in reason
    tensors: dict[str, torch.Tensor] = {}
    before = pack(state_of(method), tensors), {k: v.clone() for k, v in tensors.items()}
    state = ClientState()
    state.catch_up(plan)
    with pytest.raises(RoundFailed):
        finish_round(method, bounds, 1, name, [client], 1, method.global_delta(), [Arrival(plan, plan, bad, start_delta(state, plan))], lambda *_: None)
    after_tensors: dict[str, torch.Tensor] = {}
    after = pack(state_of(method), after_tensors)
    assert after == before[0] and all(after_tensors[k].equal(v) for k, v in before[1].items())
