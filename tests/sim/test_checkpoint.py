"""A checkpoint restores the whole simulation: the rounds after it come out bit-identical (tiny Llama, in process)."""

from __future__ import annotations

import json

from fedlora.sim import checkpoint
from fedlora.sim.federation import Simulation
from tests.sim.test_simulation import _experiment


def _entries(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def test_rounds_after_a_checkpoint_equal_the_uninterrupted_run(tiny_llama, tmp_path, name="hetlora", ranks=(4, 2, 1)):
    """HETLoRA: the richest state (global pair, learnt per-client ranks, last weights); the other methods'
    state round trip is in tests/methods/test_properties.py, resume after SIGKILL in tests/e2e/test_resume.py."""
    whole, saved = [], {}
    sim = Simulation(_experiment(tiny_llama, name, ranks))
    sim.run(whole.append, checkpoint=lambda rnd, metrics: saved.setdefault(rnd, checkpoint.save(tmp_path / "ck", sim, rnd, metrics)))
    final = {n: [(t.B.clone(), t.A.clone()) for t in ts] for n, ts in sim.exp.method.global_delta().items()}
    assert [p.name for p in checkpoint.complete(tmp_path / "ck")] == ["round-0001", "round-0002"]  # the last two

    resumed = Simulation(_experiment(tiny_llama, name, ranks))
    done = checkpoint.load(saved[1], resumed)
    assert _entries(done) == json.loads(json.dumps(_entries(whole[:2])))
    rest: list = []
    resumed.run(rest.append, done=done)
    assert _entries(rest) == _entries(whole[2:])
    again = resumed.exp.method.global_delta()
    assert final.keys() == again.keys()
    for n, terms in final.items():
        assert all(B.equal(t.B) and A.equal(t.A) for (B, A), t in zip(terms, again[n], strict=True))
