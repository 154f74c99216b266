"""configs/tiny.yaml on Flower's simulation runtime (Ray): the same ServerApp and ClientApp, virtual nodes
in Ray actors, and the in-process simulator's global update bit for bit.

One run (Ray starts once, about 10 s); marked slow with the other loopback tests.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests.flower.conftest import FAST, THREADS, TINY, dense_file, read_metrics

pytest.importorskip("ray", reason="Flower's simulation runtime needs Ray: pip install -e \".[simulation]\"")
pytestmark = pytest.mark.slow

MACHINE = {"wall_s", "rss_mb"}  # what measures the machine, not the run


def _as_in(m: dict, like: dict) -> dict:
    """``m`` cut to the keys of the simulator's line ``like`` (Flower adds wire bytes, nodes, timings), less machine figures."""
    out = {k: m[k] for k in like if k not in MACHINE}
    if "clients" in like:
        out["clients"] = [{k: c[k] for k in lc} for c, lc in zip(m["clients"], like["clients"], strict=True)]
    return out


def test_ray_simulation_equals_the_in_process_simulator_bit_for_bit(tmp_path, simulate):
    from fedlora.flower.launch import LocalFederation, Resources

    overrides = [*FAST, "federation.method=flora"]
    sim = simulate(overrides)  # the same seeded run in one process (cached: the SuperNode test compares to it too)
    fed = LocalFederation(tmp_path / "fed", 3, server_threads=THREADS, simulation=Resources(cpus=THREADS))
    try:
        fed.start()
        summary = fed.run(TINY, tmp_path / "run", overrides, checkpoint_deltas=True, round_timeout=900)
    finally:
        fed.stop()

    log = (fed.logs / "run-1.log").read_text()
    actors = set(re.findall(r"ClientAppActor pid=(\d+)", log))
    assert len(actors) >= min(2, os.cpu_count() or 1), f"the clients ran in {len(actors)} Ray actor(s); 2 CPUs at 1 each fit 2"
    assert summary["transport"] == "flower" and summary["rounds"] == 2 and summary["lost"] == []

    metrics = read_metrics(tmp_path / "run")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for rnd in (1, 2):  # G_t − W_0 after each round: the very same float32 numbers
        got, want = dense_file(tmp_path / "run" / "checkpoints" / f"round-{rnd}-delta.safetensors"), sim["deltas"][rnd]
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), f"round {rnd}"
    for f, s in zip(metrics, sim["metrics"], strict=True):  # every loss, counter, weight and diagnostic, exactly
        assert _as_in(f, s) == _as_in(s, s), f"round {f['round']}"
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "fed" / "nodes").iterdir()), "the virtual nodes' bases are kept inside the workdir"
