"""The example package of methods (examples/fedlora-example-methods), installed beside fedlora as a user would,
runs under the ``fedlora`` command by the names its entry points give: listed by ``fedlora methods`` (a process
of its own, which finds them in the installed metadata), trained by ``fedlora run`` and compared by
``fedlora compare`` (in this process, on a tiny random Llama).
``fedlora deploy`` is tests/flower/test_deploy_loopback.py's; the contract tests take the methods up from the registry."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.methods import REGISTRY, method_class
from fedlora.methods.registry import entry_points
from tests.evaluation.tiny_run import tiny_config
from tests.example_methods import NAMES, PACKAGE

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def fedlora(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    return tiny_config(tmp_path_factory.mktemp("example-package"), "slot-mean", rounds=2)


def test_the_methods_come_from_the_installed_packages_entry_points():
    """Not from fedlora and not from a test module: the installed distribution's metadata names them."""
    points = {ep.name: ep.value for ep in entry_points()}
    for name in NAMES:
        assert points[name].startswith(PACKAGE + ".") and REGISTRY[name] is method_class(name)
        assert method_class(name).__module__.startswith(PACKAGE + ".")
    declared = {n: (method_class(n).ranks, method_class(n).keeps) for n in NAMES}
    assert declared == {"server-momentum": ("one", False), "slot-mean": ("any", False), "mixed-personal": ("one", True)}


def test_fedlora_methods_lists_them_with_their_declarations(tmp_path):
    proc = fedlora("methods", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in NAMES:
        assert name in proc.stdout and method_class(name).summary[:30] in " ".join(proc.stdout.split())


def test_fedlora_run_trains_a_heterogeneous_federation_with_the_any_rank_method(config, tmp_path):
    assert main(["run", str(config), f"output.dir={tmp_path / 'run'}"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1, 2] and lines[0]["method"] == "slot-mean"
    assert [c["rank"] for c in lines[1]["clients"]] == [2, 1, 1]
    assert lines[-1]["eval"]["global"]["loss"] < lines[0]["eval"]["global"]["loss"]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_fedlora_compare_runs_all_three_beside_fedit(config, tmp_path):
    methods = "server-momentum,slot-mean,mixed-personal,fedit"
    assert main(["compare", str(config), "--methods", methods, "--seeds", "1", "--output", str(tmp_path / "cmp"), "federation.rounds=1"]) == 0
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "cmp" / "table.csv").open())}
    assert set(rows) == {*NAMES, "fedit"}
    assert rows["slot-mean"]["ranks"] == "2,1,1" and rows["server-momentum"]["ranks"] == "all 1"  # one rank: the smallest
    for name in NAMES:
        summary = json.loads((tmp_path / "cmp" / "runs" / f"{name}-seed0" / "summary.json").read_text())
        assert summary["rounds"] == 1 and float(rows[name]["loss_after_mean"]) > 0
