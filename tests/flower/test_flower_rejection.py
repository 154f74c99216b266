"""The Flower Strategy rejects a malformed reply with the simulator's validator and goes on without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlora.flower import records
from fedlora.flower.strategy import RoundFailed
from fedlora.methods.base import Factors
from tests.flower.test_flower_inprocess import _experiment, _flower


def _poison(monkeypatch, partition: int, how: str) -> None:
    """The ClientApp of ``partition`` replies with a NaN in one factor, or with a factor of the wrong rank."""
    encode = records.update_to_records

    def bad(update, **kw):
        if update.client == partition:
            name, f = next(iter(update.factors.items()))
            if how == "nan":
                f = Factors(B=f.B.clone().fill_(float("nan")), A=f.A)
            else:
                f = Factors(B=torch.zeros(f.B.shape[0], f.rank + 1), A=torch.zeros(f.rank + 1, f.A.shape[1]))
            update = dataclasses.replace(update, factors={**update.factors, name: f})
        return encode(update, **kw)

    monkeypatch.setattr(records, "update_to_records", bad)


def test_a_poisoned_reply_is_rejected_with_its_reason_and_the_round_goes_on(tiny_llama, tmp_path, monkeypatch):
    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.min_clients=2"])
    _poison(monkeypatch, 1, "nan")
    rounds, _, _ = _flower(exp, setup, tmp_path, monkeypatch)
    for r in rounds[1:]:
        assert [c["id"] for c in r["clients"]] == [0, 2] and r["lost"] == []
        assert [x["id"] for x in r["rejected"]] == [1] and "holds NaN or Inf" in r["rejected"][0]["reason"]
        assert r["agg_noise"] < 1e-6  # FLoRA over the two valid updates is still exact


def test_below_min_clients_a_rejected_reply_fails_the_round(tiny_llama, tmp_path, monkeypatch):
    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.min_clients=3"])
    _poison(monkeypatch, 2, "rank")
    with pytest.raises(RoundFailed, match=r"expected \(\d+, 1\) for rank 1"):
        _flower(exp, setup, tmp_path, monkeypatch)
    assert exp.method.global_delta() == {n: [] for n in setup.layers}  # round 1 changed nothing
