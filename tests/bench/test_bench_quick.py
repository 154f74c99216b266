"""Benchmarks 1 and 2 on tiny shapes: they still run, write the common JSON shape, and their floors do the method's work.

Nothing here is timed; the figures come from ``make bench`` (docs/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import benchlib as a sibling
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: extra threads only wait on each other


def _common_shape(path: Path, name: str) -> dict:
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == name
    assert {"nproc", "cpu_model", "torch", "threads", "uptime_before", "uptime_after"} <= set(doc["machine"])
    for t in doc["targets"]:
        assert t["met"] == (t["measured"] <= t["value"] if t["op"] == "<=" else t["measured"] >= t["value"])
    return doc


def test_aggregation_tiny_runs_every_method(tmp_path: Path) -> None:
    agg = _load("aggregation")
    out = tmp_path / "aggregation.json"
    agg.main(["--d", "80", "--blocks", "1", "--full-layers", "1", "--repeats", "1", "--threads", "1", "--out", str(out)])
    doc = _common_shape(out, "aggregation")
    methods = doc["results"]["methods"]
    assert set(methods) == set(agg.KIND)
    assert len(doc["targets"]) == len(agg.KIND)
    for r in methods.values():
        assert r["aggregate_median_s"] > 0 and r["floor_median_s"] > 0 and r["ratio"] > 0
    assert methods["full"]["layers"] == 1 and methods["flora"]["layers"] == 4


@pytest.mark.parametrize("method", ["flora", "zeropad", "fedit", "fedplora", "fedsa", "fedex", "rolora"])
def test_floor_computes_what_the_method_aggregates(method: str) -> None:
    """The bare-torch floor yields the method's own aggregate (stack or weighted mean), so the ratio compares equal work."""
    agg = _load("aggregation")
    from fedlora.methods import Setup, build_method
    from fedlora.ops.weights import data_weights

    layers = agg.layer_shapes(1, 24)
    ranks = [agg.HOMOGENEOUS] * 10 if agg.KIND[method][0] == "homo" else list(agg.RANKS)
    updates = agg.make_updates({n: s for n, s in layers.items()}, [min(r, 24) for r in ranks])
    setup = Setup(layers, {u.client: u.factors[next(iter(layers))].rank for u in updates}, {k: agg.SCALE for k in range(10)})
    m = build_method(method, setup)
    if method == "fedplora":
        import dataclasses

        updates = [dataclasses.replace(u, meta={"indices": m.indices(u.client, 1)}) for u in updates]
    weights = data_weights([u.num_examples for u in updates])
    floor = agg.floor_fn(agg.KIND[method][1], updates, weights, method)()
    m.aggregate(updates, weights, 1)
    for name in layers:
        B, A = floor[name] if method != "fedex" else (None, None)
        if method == "flora":
            (merged,) = m.global_delta()[name]
            torch.testing.assert_close(B @ A, merged.dense())  # held dense on this 24-wide layer: the smaller form
        elif method == "zeropad":
            (merged,) = m.global_delta()[name]
            torch.testing.assert_close((B * agg.SCALE) @ A, merged.dense())  # zero-padding folds s_k into B
        elif method == "fedsa":
            torch.testing.assert_close(A, m.A[name])  # Σ p_k A_k only
        elif method == "rolora":
            torch.testing.assert_close(B, m.factors[name].B)  # round 1 averages B
        elif method == "fedex":  # the K centred pairs: their sum is the residual merged into the base
            (_, residual), = m.merged.recent[name]
            torch.testing.assert_close(sum(b @ a for b, a in floor[name]), residual.dense())
        else:  # fedit, and fedplora on every module some client trained (all of them here)
            torch.testing.assert_close(B, m.factors[name].B)
            torch.testing.assert_close(A, m.factors[name].A)


def test_flexlora_svd_tiny_agrees_with_dense(tmp_path: Path) -> None:
    svd = _load("flexlora_svd")
    out = tmp_path / "flexlora_svd.json"
    svd.main(["--d", "256", "--repeats", "1", "--dense-repeats", "1", "--threads", "1", "--out", str(out)])
    doc = _common_shape(out, "flexlora_svd")
    assert doc["results"]["max_rel_diff_singular_values"] < 1e-3
    assert doc["results"]["rel_diff_rank64_truncation"] < 1e-3


def test_rounds_tiny_runs_every_method_and_its_state_stays_bounded(tmp_path: Path) -> None:
    """Benchmark 6 on 48-wide layers, 60 rounds: every method runs through the real server and model paths;
    state and checkpoint bytes never pass twice the layers' dense size (methods.md §4)."""
    rounds = _load("rounds")
    from fedlora.methods import REGISTRY

    out = tmp_path / "rounds.json"
    rounds.main(["--d", "48", "--blocks", "1", "--rounds", "60", "--clients", "20", "--threads", "1", "--out", str(out)])
    doc = _common_shape(out, "rounds")
    methods = doc["results"]["methods"]
    assert set(methods) == set(REGISTRY)
    dense = 4 * 48 * 48 * 4  # four float32 48 × 48 layers
    for name, r in methods.items():
        rows = r["per_round"]
        assert len(rows) == 60 and all(x["server_s"] > 0 for x in rows)
        if name in ("flora", "zeropad"):  # T_t (dense by now) plus merges cheaper than a reset
            assert max(x["state_bytes"] for x in rows) <= 2 * dense
            assert rows[-1]["state_bytes"] >= dense
        if name == "flora":
            assert all(x["agg_noise"] < 1e-5 for x in rows)  # exact to the float32 round-off of the server's sum
        if name not in ("local", "full"):  # a client's own adapter (local) grows with the clients seen, not the rounds
            assert rows[-1]["checkpoint_bytes"] <= 1.1 * max(x["checkpoint_bytes"] for x in rows[:20])
