"""Loopback Flower deployments for the tests, stopped by process group even when a test fails."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from fedlora.flower.settings import ENV

for _key, _value in ENV.items():  # FLWR_TELEMETRY_ENABLED=0, FLWR_DISABLE_UPDATE_CHECK=1, …, HF_HUB_OFFLINE=1
    os.environ[_key] = _value

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ["train.local_steps=1", "train.max_length=64", "eval.max_examples=8", "data.max_examples=160"]
"""configs/tiny.yaml made cheaper: one local step, shorter sequences, smaller eval splits."""

THREADS = 1
"""Torch threads of every process: the nodes', the ServerApp's and the simulator's. Float32 sums
depend on the thread count (1 vs 2 threads moves G_1 − W_0 by 1.4e-3 relative); with equal counts
the Flower run and the simulator agree bit for bit. One thread is also the fastest on a small,
busy machine (an evaluation took 8 s with 1 thread, 19–48 s with 2 on 2 shared cores)."""

LAYERS = 30  # SmolLM2-135M: q_proj 576×576 and v_proj 192×576 in each of 30 blocks
QV = (576 + 576) + (576 + 192)  # Σ over {q, v} of d_in + d_out


def read_metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def as_in(m: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """A metrics line cut to the keys of the simulator's line ``like`` (Flower adds wire bytes, nodes, timings), less times and memory."""
    out = {k: m[k] for k in like if k not in ("wall_s", "rss_mb")}
    if "clients" in like:
        out["clients"] = [{k: c[k] for k in lc} for c, lc in zip(m["clients"], like["clients"], strict=True)]
    return out


def assert_bit_for_bit(run: Path, sim: dict[str, Any]) -> None:
    """Every metrics line (bar times) and every G_t − W_0 of a Flower run with ``checkpoint_deltas`` equal the simulator's."""
    metrics = read_metrics(run)
    assert [m["round"] for m in metrics] == sorted(sim["metrics_by_round"])
    for f in metrics:  # every loss, counter, weight and diagnostic, exactly
        s = sim["metrics_by_round"][f["round"]]
        assert as_in(f, s) == as_in(s, s), f"round {f['round']}"
    for rnd, want in sim["deltas"].items():  # the very same float32 numbers (round 0: none written, G_0 = W_0)
        if rnd == 0:
            continue
        got = dense_file(run / "checkpoints" / f"round-{rnd}-delta.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), f"round {rnd}"


def dense(delta) -> dict[str, torch.Tensor]:
    """G − W_0 per layer, densified in float64."""
    return {n: sum(t.dense().double() for t in terms) for n, terms in delta.items() if terms}


def dense_file(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoints/round-<t>-delta.safetensors file, densified per layer."""
    from safetensors.torch import load_file

    from fedlora.ops.delta_tensors import tensors_to_delta

    return dense(tensors_to_delta(load_file(path)))


def rel_err_layers(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    """‖x − y‖_F / ‖y‖_F over all layers together."""
    assert set(x) == set(y)
    num = sum(float(torch.linalg.norm(x[n] - y[n])) ** 2 for n in y)
    den = sum(float(torch.linalg.norm(y[n])) ** 2 for n in y)
    return (num / den) ** 0.5


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The kill sweep runs only when ``-m`` names it: pyproject's ``addopts = "-m 'not sweep'"`` keeps it out of
    ``make test``, but any ``-m`` on the command line replaces that one (``-m slow``, ``-m "not slow"``)."""
    if "sweep" in (config.getoption("markexpr", "") or ""):
        return
    swept = [item for item in items if item.get_closest_marker("sweep") is not None]
    if swept:
        config.hook.pytest_deselected(items=swept)
        items[:] = [item for item in items if item.get_closest_marker("sweep") is None]


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """Convert the embedded SmolLM2 once before any node process races to do it."""
    from fedlora.model.loading import resolve_model_dir

    return resolve_model_dir(None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama folder (hidden 32): for deployment tests whose claim holds for any model."""
    from tests.tiny_folder import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


_SIMS: dict[tuple[str, ...], dict[str, Any]] = {}


@pytest.fixture(scope="session")
def simulate(embedded_model) -> Callable[[list[str]], dict[str, Any]]:
    """The in-process simulator on the same config: metrics and G_t − W_0 (dense) after every round; cached."""

    def run(overrides: list[str]) -> dict[str, Any]:
        key = tuple(overrides)
        if key not in _SIMS:
            from fedlora.config import load_config
            from fedlora.federation.experiment import prepare
            from fedlora.sim.federation import Hooks, Simulation

            cfg = load_config(TINY, overrides)
            torch.manual_seed(cfg.seed)
            exp = prepare(cfg)
            deltas: dict[int, dict[str, torch.Tensor]] = {}
            records: list[dict[str, Any]] = []
            hooks = Hooks(round_end=lambda e: deltas.__setitem__(e["round"], dense(exp.method.global_delta())))
            threads = torch.get_num_threads()
            torch.set_num_threads(THREADS)
            try:
                Simulation(exp, hooks).run(records.append)
            finally:
                torch.set_num_threads(threads)
            metrics = json.loads(json.dumps(records))
            _SIMS[key] = {"metrics": metrics, "metrics_by_round": {m["round"]: m for m in metrics}, "deltas": deltas}
            del exp
        return _SIMS[key]

    return run


@pytest.fixture
def federation(tmp_path_factory, embedded_model) -> Iterator[Callable[..., Any]]:
    """Start LocalFederations on demand; every one is stopped (by process group) when the test ends."""
    from fedlora.flower.launch import LocalFederation

    started: list[LocalFederation] = []

    def start(nodes: int = 3, **kwargs: Any) -> LocalFederation:
        fed = LocalFederation(tmp_path_factory.mktemp("flower"), nodes, threads_per_node=THREADS, server_threads=THREADS, **kwargs)
        started.append(fed)  # registered before start(): a half-started federation is stopped too
        return fed.start()

    try:
        yield start
    finally:
        for fed in started:
            fed.stop()
