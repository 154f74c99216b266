"""configs/tiny.yaml on Flower's simulation runtime (Ray): the same ServerApp and ClientApp, virtual nodes
in Ray actors, and the in-process simulator's global update bit for bit.

One run (Ray starts once, about 10 s); marked slow with the other loopback tests.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.flower.conftest import FAST, THREADS, TINY, assert_bit_for_bit, read_metrics

pytest.importorskip("ray", reason="Flower's simulation runtime needs Ray: pip install -e \".[simulation]\"")
pytestmark = pytest.mark.slow

def test_ray_simulation_equals_the_in_process_simulator_bit_for_bit(tmp_path, simulate):
    from fedlora.flower.launch import LocalFederation, Resources, _ray_tmp

    overrides = [*FAST, "federation.method=flora"]
    sim = simulate(overrides)  # the same seeded run in one process (cached: the SuperNode test compares to it too)
    fed = LocalFederation(tmp_path / "fed", 3, server_threads=THREADS, simulation=Resources(cpus=THREADS))
    try:
        fed.start()
        summary = fed.run(TINY, tmp_path / "run", [*overrides, "output.trackers=[tensorboard]"], checkpoint_deltas=True, round_timeout=900)
    finally:
        fed.stop()

    log = (fed.logs / "run-1.log").read_text()
    actors = set(re.findall(r"ClientAppActor pid=(\d+)", log))
    assert len(actors) >= min(2, os.cpu_count() or 1), f"the clients ran in {len(actors)} Ray actor(s); 2 CPUs at 1 each fit 2"
    assert summary["transport"] == "flower" and summary["rounds"] == 2 and summary["lost"] == []

    assert [m["round"] for m in read_metrics(tmp_path / "run")] == [0, 1, 2]
    assert_bit_for_bit(tmp_path / "run", sim)  # every metrics line and every G_t − W_0, exactly
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the ServerApp feeds the trackers too

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    lines = read_metrics(tmp_path / "run")
    assert [e.step for e in events.Scalars("global/loss")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("global/loss")] == pytest.approx([m["eval"]["global"]["loss"] for m in lines], rel=1e-6)
    assert list((tmp_path / "fed" / "nodes").iterdir()), "the virtual nodes' bases are kept inside the workdir"
    ray = _ray_tmp(fed.workdir)
    assert ray.is_relative_to(fed.workdir) or not ray.exists(), f"Ray's session folder {ray} outlived the federation"
