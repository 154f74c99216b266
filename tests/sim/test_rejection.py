"""The server half of a round leaves a malformed update out, and below min_clients changes nothing (float64)."""

from __future__ import annotations

import pytest
import torch

from fedlora.methods import REGISTRY, Setup, build_method
from fedlora.methods.base import Factors
from fedlora.methods.state import pack, state_of
from fedlora.federation.round import Arrival, RoundFailed, bounds_of, finish_round
from fedlora.train.client import ClientState, start_delta
from tests.conftest import random_update

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 10)}
RANKS = {0: 4, 1: 2, 2: 1}


def _method(name: str):
    ranks = RANKS if REGISTRY[name].ranks == "any" else {k: 2 for k in RANKS}
    return build_method(name, Setup(LAYERS, ranks, {k: 2.0 for k in RANKS}, seed=0, dtype=torch.float64))


def _arrivals(method, gen, rnd=1):
    out = []
    for k in RANKS:
        plan = method.plan(k, rnd)
        update = random_update(k, LAYERS, plan.rank, plan.scale, 10 * (k + 1), gen)
        if "indices" in plan.meta:
            update.meta["indices"] = plan.meta["indices"].clone()
        state = ClientState()
        state.catch_up(plan)
        out.append(Arrival(plan, plan, update, start_delta(state, plan)))
    return out


def _finish(method, arrivals, min_clients=1, heads=None):
    calls = heads if heads is not None else []
    return finish_round(method, bounds_of(method, 1e4), 1, method.name, list(RANKS), min_clients, method.global_delta(), arrivals,
                        lambda clients, heads, w: calls.append(len(clients)))


def _snapshot(method) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(state_of(method), tensors)
    return {"skeleton": skeleton, **tensors}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("name", ["flora", "fedplora", "fedit"])
def test_a_malformed_update_is_left_out_and_logged_with_its_reason(name, gen):
    method, reference = _method(name), _method(name)
    arrivals = _arrivals(method, gen)
    bad = arrivals[1].update.factors["l0.q"]
    arrivals[1].update.factors["l0.q"] = Factors(B=torch.zeros(12, bad.rank + 1, dtype=torch.float64), A=torch.zeros(bad.rank + 1, 10, dtype=torch.float64))
    entry = _finish(method, arrivals)
    r = bad.rank
    assert entry["rejected"] == [{"id": 1, "reason": f"layer l0.q: B has shape (12, {r + 1}), expected (12, {r}) for rank {r}"}]
    assert [c["id"] for c in entry["clients"]] == [0, 2] and len(entry["weights"]) == 2
    good = [a for a in arrivals if a.plan.client != 1]
    _finish(reference, good)
    assert _same(_snapshot(method), _snapshot(reference))  # exactly the round without client 1


@pytest.mark.parametrize("name", ["flora", "fedplora"])
def test_below_min_clients_the_round_fails_and_the_global_state_is_untouched(name, gen):
    method = _method(name)
    _finish(method, _arrivals(method, gen))  # one good round first, so the state is not the init
    before, heads = _snapshot(method), []
    arrivals = _arrivals(method, gen, rnd=2)
    arrivals[0].update.factors["l0.v"].B[0, 0] = float("nan")
    with pytest.raises(RoundFailed, match=r"2 usable updates of 3 .*min_clients=3.*NaN or Inf"):
        _finish(method, arrivals, min_clients=3, heads=heads)
    assert _same(_snapshot(method), before) and heads == []


def test_fedplora_indices_that_repeat_or_differ_from_the_selection_are_rejected(gen):
    method = _method("fedplora")
    arrivals = _arrivals(method, gen)
    arrivals[0].update.meta["indices"] = torch.tensor([0, 0, 1, 2])
    arrivals[1].update.meta["indices"] = arrivals[1].plan.meta["indices"].flip(0) if RANKS[1] > 1 else torch.tensor([3])
    entry = _finish(method, arrivals)
    reasons = {x["id"]: x["reason"] for x in entry["rejected"]}
    assert set(reasons) == {0, 1} and "repeat a module" in reasons[0] and "expected the selected" in reasons[1]
