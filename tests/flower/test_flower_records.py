"""The Flower wire format, pure (no network): plan/update → records → plan/update for every method."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlora.flower.records import (
    PLAN_ARRAYS, RAW, WireError, from_array, message_nbytes, plan_to_records, records_to_plan, records_to_update, to_array,
    update_to_records,
)
from fedlora.methods import REGISTRY, MethodError, Setup, build_method
from fedlora.methods.base import BaseUpdate, ClientPlan, ClientUpdate, Factors, as_received, client_finish, client_prepare, plan_nbytes, update_nbytes
from fedlora.ops.lowrank import Dense, LowRank

LAYERS = {"m.layers.0.q_proj": (6, 5), "m.layers.0.v_proj": (3, 5), "m.layers.1.q_proj": (6, 5)}
CAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _method(name: str):
    for ranks in ({0: 3, 1: 2, 2: 1}, {0: 2, 1: 2, 2: 2}):
        try:
            return build_method(name, Setup(LAYERS, ranks, {k: 2.0 for k in ranks}, seed=3))
        except MethodError:
            continue
    raise AssertionError(f"{name}: no setup builds")


def _trained(method, plan: ClientPlan, gen: torch.Generator) -> ClientUpdate:
    """What a client would upload: factors at the plan's ranks (frozen A kept), after client_finish."""
    prepared = client_prepare(method, plan)
    factors = {}
    for name, (d_out, d_in) in LAYERS.items():
        r = prepared.rank_pattern.get(name, prepared.rank)
        init = (prepared.init or {}).get(name)
        A = init.A.clone() if init is not None and not prepared.train_A else torch.randn(r, d_in, generator=gen)
        factors[name] = Factors(B=torch.randn(d_out, A.shape[0], generator=gen), A=A)
    update = ClientUpdate(client=plan.client, num_examples=7 + plan.client, scale=plan.scale, factors=factors, train_loss=1.25)
    return client_finish(method, prepared, update)


def _round_two_plans(name: str):
    """Plans of round 2 (after one aggregation: base updates, folds, inits and meta are non-trivial)."""
    gen = torch.Generator().manual_seed(0)
    method = _method(name)
    clients = [0] if method.pooled else [0, 1, 2]
    updates = [_trained(method, method.plan(k, 1), gen) for k in clients]
    method.aggregate(updates, [u.num_examples / sum(x.num_examples for x in updates) for u in updates], 1)
    plans = [method.plan(k, 2) for k in clients]
    return method, plans, [_trained(method, p, gen) for p in plans]


def _same(x, y, cast=None) -> None:
    """Bit-for-bit equality of nested plans/updates; with ``cast``, float tensors equal x rounded through it."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.shape == y.shape
        if x.is_floating_point():
            assert y.dtype == torch.float32
            expected = x.to(cast).float() if cast is not None else x.float()
            assert torch.equal(expected, y)
        else:
            assert x.dtype == y.dtype and torch.equal(x, y)
    elif dataclasses.is_dataclass(x):
        assert type(x) is type(y)
        for f in dataclasses.fields(x):
            _same(getattr(x, f.name), getattr(y, f.name), cast)
    elif isinstance(x, dict):
        assert isinstance(y, dict) and set(x) == set(y), f"{sorted(x)} != {sorted(y)}"
        for k in x:
            _same(x[k], y[k], cast)
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y)
        for a, b in zip(x, y):
            _same(a, b, cast)
    else:
        assert type(x) is type(y) and (x == y or (x != x and y != y)), f"{x!r} != {y!r}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_flower_plan_and_update_round_trip_bit_for_bit_in_float32(name):
    method, plans, updates = _round_two_plans(name)
    for plan, update in zip(plans, updates):
        _same(plan, records_to_plan(plan_to_records(plan, "float32")))
        prepared = client_prepare(method, plan)
        up = update_to_records(update, upload=prepared.upload, wire="float32")
        back = records_to_update(up, prepared, method.setup.layers)
        _same(as_received(update, prepared, method.setup.layers), back)
        factors = [k for k in up.array_records["update.arrays"] if k.startswith("factors/")]
        assert len(factors) == len(prepared.upload) * len(update.factors)  # only the uploaded factors travelled


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["flora", "fedplora", "hetlora", "ffa"])
def test_flower_round_trip_in_half_precision_is_the_cast(name, wire):
    """Every float arrives as exactly the float32 value of its wire-dtype rounding; integers unchanged."""
    method, plans, updates = _round_two_plans(name)
    for plan, update in zip(plans, updates):
        _same(plan, records_to_plan(plan_to_records(plan, wire)), CAST[wire])
        prepared = client_prepare(method, plan)
        up = update_to_records(update, upload=prepared.upload, wire=wire)
        assert all(up.array_records["update.arrays"][k].dtype == wire for k in up.array_records["update.arrays"] if k.startswith("factors/"))
        back = records_to_update(up, prepared, method.setup.layers)
        if prepared.upload == "BA":
            _same(update, back, CAST[wire])
        else:  # the frozen A never travelled: the receiver's own copy, exact
            _same({n: f.B for n, f in update.factors.items()}, {n: f.B for n, f in back.factors.items()}, CAST[wire])
            _same({n: f.A for n, f in update.factors.items()}, {n: f.A for n, f in back.factors.items()})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_flower_message_bytes_are_the_method_counters_plus_key_names(name):
    method, plans, updates = _round_two_plans(name)
    for plan, update in zip(plans, updates):
        rd = plan_to_records(plan, "float32")
        keys = sum(len(k) for k in rd.array_records[PLAN_ARRAYS])
        assert message_nbytes(rd) == plan_nbytes(plan) + keys
        upload = client_prepare(method, plan).upload
        up = update_to_records(update, upload=upload)
        assert message_nbytes(up) == update_nbytes(update, upload) + sum(len(k) for r in up.array_records.values() for k in r)


def test_flower_bfloat16_halves_the_float_payload():
    method, plans, _ = _round_two_plans("flora")
    plan = plans[0]
    assert plan.base is not None and plan.base.reset, "round 2 of flora carries the round-1 stack"
    payload = lambda rd: sum(len(a.data) for r in rd.array_records.values() for a in r.values())  # noqa: E731
    assert payload(plan_to_records(plan, "bfloat16")) * 2 == payload(plan_to_records(plan, "float32")) == plan_nbytes(plan)


def test_flower_meta_keeps_types_and_integers_stay_exact():
    K = torch.tensor([5, 0, 2], dtype=torch.int64)
    base = BaseUpdate(1, 3, merges={"a": [LowRank(torch.ones(2, 1), torch.ones(1, 4)), Dense(torch.ones(2, 4))]}, reset={"b": [Dense(torch.zeros(3, 4))]})
    plan = ClientPlan(client=2, round=4, rank=3, scale=0.5, rank_pattern={"m.layers.1.q_proj": 1}, base=base,
                      fold={"a": [LowRank(torch.ones(2, 1), torch.ones(1, 4)), LowRank(torch.zeros(2, 2), torch.ones(2, 4))]},
                      meta={"indices": K, "seed": torch.tensor(7), "gamma": 0.99, "r_min": 1, "mode": "x", "flag": True})
    back = records_to_plan(plan_to_records(plan, "bfloat16"))
    assert back.meta["gamma"] == 0.99 and type(back.meta["r_min"]) is int and back.meta["mode"] == "x" and back.meta["flag"] is True
    assert back.meta["indices"].dtype == torch.int64 and torch.equal(back.meta["indices"], K) and back.meta["seed"].shape == ()
    assert back.rank_pattern == {"m.layers.1.q_proj": 1} and back.init is None and (back.base.since, back.base.version) == (1, 3)
    assert [type(t).__name__ for t in back.base.merges["a"]] == ["LowRank", "Dense"] and torch.equal(back.base.merges["a"][1].W, torch.ones(2, 4))
    assert list(back.base.reset) == ["b"] and back.base.reset["b"][0].W.shape == (3, 4)
    assert [t.rank for t in back.fold["a"]] == [1, 2]
    assert records_to_plan(plan_to_records(ClientPlan(client=0, round=1, rank=1, scale=1.0))).base is None


def test_flower_task_head_travels_both_ways():
    gen = torch.Generator().manual_seed(1)
    head = {"score.weight": torch.randn(2, 32, generator=gen), "score.bias": torch.randn(2, generator=gen)}
    plan = ClientPlan(client=1, round=1, rank=2, scale=2.0, head=head)
    _same(plan, records_to_plan(plan_to_records(plan)))
    update = ClientUpdate(client=1, num_examples=3, scale=2.0, factors={"a": Factors(torch.ones(2, 1), torch.ones(1, 3))}, head=head)
    _same(update, records_to_update(update_to_records(update), plan, {"a": (2, 3)}))
    assert message_nbytes(plan_to_records(plan)) == plan_nbytes(plan) + len("head/score.weight") + len("head/score.bias")


def test_flower_wire_rejects_what_it_cannot_carry():
    with pytest.raises(WireError, match="meta"):
        plan_to_records(ClientPlan(client=0, round=1, rank=1, scale=1.0, meta={"bad": [1, 2]}))
    with pytest.raises(WireError, match="wire_dtype"):
        plan_to_records(ClientPlan(client=0, round=1, rank=1, scale=1.0), "int8")
    a = to_array(torch.ones(2, 2), torch.float32)
    assert a.stype == RAW and len(a.data) == 16
    a.stype = "numpy.ndarray"
    with pytest.raises(WireError, match="stype"):
        from_array(a)
    update = ClientUpdate(client=0, num_examples=1, scale=1.0, factors={"a": Factors(torch.ones(2, 1), torch.ones(1, 3))})
    plan = ClientPlan(client=0, round=1, rank=1, scale=1.0, train_A=False)
    with pytest.raises(WireError, match="A did not travel"):
        records_to_update(update_to_records(update, upload="B"), plan, {"a": (2, 3)})
    with pytest.raises(WireError, match="the plan uploads"):
        records_to_update(update_to_records(update, upload="BA"), plan, {"a": (2, 3)})
