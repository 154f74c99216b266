"""A checkpoint restores the whole simulation: the rounds after it come out bit-identical (tiny Llama, in process)."""

from __future__ import annotations

import json

import pytest

from fedlora.app import checkpoint
from fedlora.sim.federation import Simulation
from tests.sim.test_simulation import _experiment


def _entries(records):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "rss_mb")} for r in records]


@pytest.mark.parametrize("name, ranks", [("hetlora", (4, 2, 1)), ("flora", (4, 2, 1)), ("fedsa", (2, 2, 2)), ("fedex", (2, 2, 2))])
def test_rounds_after_a_checkpoint_equal_the_uninterrupted_run(tiny_llama, tmp_path, name, ranks):
    """HETLoRA: the richest state (global pair, learnt per-client ranks, last weights); FLoRA: the merged base,
    rebuilt on the model from the method's state; FedSA-LoRA: what every client keeps (its B), which
    the checkpoint holds for the in-process clients; FedEx-LoRA: a merged base beside a live adapter.
    The other methods' state round trip is in
    tests/methods/test_properties.py, resume after SIGKILL in tests/e2e/test_resume.py."""
    whole, saved = [], {}
    sim = Simulation(_experiment(tiny_llama, name, ranks))
    sim.run(whole.append, checkpoint=lambda entry, lines: saved.setdefault(entry["round"], checkpoint.save(tmp_path / "ck", sim.server, entry["round"], lines, entry)))
    final = {n: [[x.clone() for x in t.tensors()] for t in ts] for n, ts in sim.exp.method.global_delta().items()}
    weights = {n: p.clone() for n, p in sim.exp.host.model.state_dict().items()}
    assert [p.name for p in checkpoint.complete(tmp_path / "ck")] == ["round-0001", "round-0002"]  # the last two

    sim.exp.host.reset_base()  # the fixture's model back to W_0 for the second experiment
    resumed = Simulation(_experiment(tiny_llama, name, ranks))
    done = checkpoint.load(saved[1], resumed.server, whole)
    assert _entries(done) == json.loads(json.dumps(_entries(whole[:2])))
    rest: list = []
    resumed.run(rest.append, done=done)
    assert _entries(rest) == _entries(whole[2:])
    again = resumed.exp.method.global_delta()
    assert final.keys() == again.keys()
    for n, terms in final.items():
        assert all(all(x.equal(y) for x, y in zip(xs, t.tensors(), strict=True)) for xs, t in zip(terms, again[n], strict=True))
    assert all(p.equal(weights[n]) for n, p in resumed.exp.host.model.state_dict().items())  # the model's base too
    assert sim.server.kept.keys() == resumed.server.kept.keys() and (not sim.exp.method.keeps or sim.server.kept)
    for k, own in sim.server.kept.items():  # what each client keeps (FedSA-LoRA's B), bit for bit
        assert own.keys() == resumed.server.kept[k].keys() and all(own[n].equal(resumed.server.kept[k][n]) for n in own)
