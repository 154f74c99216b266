"""`fedlora study` end to end: a 2 × 2 × 2 grid on configs/tiny.yaml, killed mid-cell and resumed cell by cell.

The cells run on a tiny random Llama (tests/tiny_folder.py): the claims here are about processes, run
folders and statistics, not about the model. The study is SIGKILLed while one cell is between rounds
and another has finished; the running cells end with it (no orphan holds a run folder); the second
start reruns no finished cell, resumes the interrupted one from its checkpoint (and it ends equal to
an uninterrupted run of the same cell), and the paired table equals a hand computation from the folders.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.tiny_folder import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"}
ROUNDS = 40  # a cell's rounds take long enough (a checkpoint each) to be caught between two of them


def fedlora(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora.cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def spec(tmp: Path, model: Path, steps: str = "[1, 2]") -> Path:
    path = tmp / "grid.yaml"
    path.write_text(f"""config: {ROOT / 'configs' / 'tiny.yaml'}
overrides: [model.path={model}, federation.rounds={ROUNDS}, train.lr=0.05, train.max_length=64, eval.max_examples=4,
            data.max_examples=60, eval.every=10, eval.client_splits=ends]
seeds: 2
factors:
  method: [flora, fedit]
  steps: {{key: train.local_steps, values: {steps}}}
reference: fedit
""")
    return path


def lines_of(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def checkpointed(folder: Path) -> bool:
    return (folder / "checkpoints" / "round-0001").is_dir() and not (folder / "summary.json").exists()


def processes_in(folder: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(folder) in part for part in p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.mark.slow
def test_a_killed_study_resumes_cell_by_cell_and_its_statistics_are_the_hand_computation(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    study = spec(tmp_path, model)
    out = tmp_path / "grid"
    runs = out / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "study", str(study), "--jobs", "2", "--threads", "1"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        folders = list(runs.glob("*")) if runs.is_dir() else []
        if any((f / "summary.json").exists() for f in folders) and any(checkpointed(f) for f in folders):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(30) == -signal.SIGKILL, "the study ended before it could be caught mid-cell"
    finished = {f.name for f in runs.glob("*") if (f / "summary.json").exists()}
    partial = {f.name for f in runs.glob("*") if checkpointed(f)}
    assert finished and partial
    deadline = time.time() + 30  # the cells got SIGTERM with their parent: none is left holding a run folder
    while processes_in(out) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_in(out)
    ended = [json.loads(x) for x in (out / "cpu.jsonl").read_text().splitlines()]
    for name in partial:  # a cell that ended with the study wrote its own CPU seconds: resumed cells count every process
        assert any(x["cell"] == name and x.get("ended_with_the_study") and x["cpu_s"] > 0 and x["exit"] == -15 for x in ended), ended

    again = fedlora("study", str(study), "--jobs", "2", "--threads", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    logs = out / "logs"
    for name in finished:  # not run again: one command in its log
        assert (logs / f"{name}.log").read_text().count("$ ") == 1
    for name in partial:  # resumed from its checkpoint, not from round 0
        log_text = (logs / f"{name}.log").read_text()
        assert log_text.count("$ ") == 2 and "--resume" in log_text
        after = int(log_text.split("after round ")[1].split()[0])
        assert after >= 1
    for folder in runs.glob("*"):
        assert [m["round"] for m in lines_of(folder)] == list(range(ROUNDS + 1)), folder.name
        assert not (folder / "checkpoints").exists()  # a finished cell keeps its record, not what only a resume needs

    # the resumed cell equals the same cell run without interruption (same threads: float sums depend on them)
    name = sorted(partial)[0]
    ref = tmp_path / "reference"
    cmd = (logs / f"{name}.log").read_text().splitlines()[0].removeprefix("$ ").split()
    cmd = [c if not c.startswith("output.dir=") else f"output.dir={ref}" for c in cmd]
    done = subprocess.run(cmd, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    strip = lambda ls: [{k: v for k, v in m.items() if k not in ("wall_s", "rss_mb")} for m in ls]  # noqa: E731
    assert strip(lines_of(runs / name)) == strip(lines_of(ref))

    # the paired table by hand: final global loss, flora − fedit per seed, t with 1 degree of freedom (Cauchy)
    final = {f.name: lines_of(f)[-1]["eval"]["global"]["loss"] for f in runs.glob("*")}
    rows = {r["method"]: r for r in csv.DictReader((out / "paired.csv").open())}
    for steps in ("steps1", "steps2"):
        d = [final[f"flora-{steps}-seed{s}"] - final[f"fedit-{steps}-seed{s}"] for s in (0, 1)]
        mean, sd = sum(d) / 2, abs(d[0] - d[1]) / math.sqrt(2)
        row = rows[f"{steps}: flora"]
        assert row["Δ mean ± 95 % CI"] == f"{mean:.4f} ± {12.706204736174707 * sd / math.sqrt(2):.4f}"
        t = mean / (sd / math.sqrt(2))
        assert float(row["p (paired t)"]) == pytest.approx(1 - 2 * math.atan(abs(t)) / math.pi, rel=1e-2)

    # a fresh copy of the records alone (no logs, no checkpoints) rebuilds the same tables
    copy = tmp_path / "copy"
    shutil.copytree(out, copy / "grid", ignore=shutil.ignore_patterns("logs", "*.png", "*.pdf", "*.md", "*.csv", "*.tex"))
    shutil.copy(study, copy / "grid.yaml")
    rebuilt = fedlora("study", str(copy / "grid.yaml"), "--tables-only")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    for table in ("cells.csv", "paired.csv", "cells.tex", "paired.md"):
        assert (copy / "grid" / table).read_text() == (out / table).read_text(), table

    # a new level: --dry-run lists the finished cells and times one first round per new setting
    dry = fedlora("study", str(spec(tmp_path, model, "[1, 2, 3]")), "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert dry.stdout.count(" done ") >= 8 and "timed:" in dry.stdout and "left: 4 cells" in dry.stdout
    assert not any(runs.glob("*steps3*"))  # a dry run runs nothing in the study's folder


def test_a_cell_folder_from_other_settings_stops_the_study_in_one_line(tmp_path):
    model = tmp_path / "nomodel"
    study = spec(tmp_path, model)
    folder = tmp_path / "grid" / "runs" / "flora-steps1-seed0"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text())
    res = fedlora("study", str(study), "--dry-run")
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.startswith("error:") and "was run with" in err and "move that folder away" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_cells_run_as_ray_tasks_on_a_cluster(tmp_path):
    pytest.importorskip("ray")
    model = save_tiny_model(tmp_path / "model")
    study = tmp_path / "one.yaml"
    study.write_text(f"config: {ROOT / 'configs' / 'tiny.yaml'}\noverrides: [model.path={model}, federation.rounds=2, "
                     "train.max_length=64, eval.max_examples=4, data.max_examples=60]\nseeds: 1\nfactors:\n  method: [flora, fedit]\n")
    res = fedlora("study", str(study), "--ray", "local", "--threads", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    ledger = [json.loads(x) for x in (tmp_path / "one" / "cpu.jsonl").read_text().splitlines()]
    assert sorted(x["cell"] for x in ledger) == ["fedit-seed0", "flora-seed0"] and all(x["exit"] == 0 and x["ray"] == "local" for x in ledger)
    for cell in ("flora-seed0", "fedit-seed0"):
        assert [m["round"] for m in lines_of(tmp_path / "one" / "runs" / cell)] == [0, 1, 2]
    assert (tmp_path / "one" / "paired.csv").is_file()
