"""The Flower Strategy rejects a malformed reply with the simulator's validator and goes on without it."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import Array

from fedlora.flower import records
from fedlora.flower.strategy import RoundFailed
from fedlora.methods.base import Factors
from tests.flower.test_flower_inprocess import _experiment, _flower


def _poison(monkeypatch, partition: int, how: str) -> None:
    """The ClientApp of ``partition`` replies with a NaN in one factor, or with an array that is no fedlora tensor."""
    encode = records.update_to_records

    def bad(update, **kw):
        if update.client != partition:
            return encode(update, **kw)
        name, f = next(iter(update.factors.items()))
        if how == "nan":
            return encode(dataclasses.replace(update, factors={**update.factors, name: Factors(B=f.B.clone().fill_(float("nan")), A=f.A)}), **kw)
        content = encode(update, **kw)
        arrays = content.array_records[records.UPDATE_ARRAYS]
        arrays[f"factors/{name}/B"] = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=b"\0" * 16)
        return content

    monkeypatch.setattr(records, "update_to_records", bad)


def test_a_poisoned_reply_is_rejected_with_its_reason_and_the_round_goes_on(tiny_llama, tmp_path, monkeypatch):
    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.min_clients=2"])
    _poison(monkeypatch, 1, "nan")
    rounds, _, _ = _flower(exp, setup, tmp_path, monkeypatch)
    for r in rounds[1:]:
        assert [c["id"] for c in r["clients"]] == [0, 2] and r["lost"] == []
        assert [x["id"] for x in r["rejected"]] == [1] and "holds NaN or Inf" in r["rejected"][0]["reason"]
        assert r["agg_noise"] < 1e-6  # FLoRA over the two valid updates is still exact


def test_below_min_clients_an_undecodable_reply_fails_the_round(tiny_llama, tmp_path, monkeypatch):
    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.min_clients=3"])
    _poison(monkeypatch, 2, "wire")
    with pytest.raises(RoundFailed, match=r"'id': 2, 'reason': \"undecodable reply: array of stype 'numpy.ndarray'"):
        _flower(exp, setup, tmp_path, monkeypatch)
    assert exp.method.global_delta() == {n: [] for n in setup.layers}  # round 1 changed nothing
