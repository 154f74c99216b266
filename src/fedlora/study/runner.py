"""Running a study's cells: each one an ordinary ``fedlora run`` in its own process and run folder.

A cell whose folder holds a finished run is skipped; one that holds checkpoints resumes from the
newest (``fedlora run --resume``), not from round 0; a folder made from other settings stops the
study with one line rather than be mixed in. ``jobs`` cells run side by side, each with its share
of the CPU threads (and, with CUDA, its own GPU in turn); with a Ray cluster address the cells are
Ray tasks on that cluster instead, each asking Ray for its CPUs (and GPUs). CPU seconds are taken
from the operating system per process (``os.wait4``), so the CPU hours a table reports are what the
runs used, whatever else the machine was doing.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, load_config
from fedlora.app.run_dir import _flat, finished
from fedlora.study.ledger import NAME, append, load_average
from fedlora.study.spec import Cell, Study

log = logging.getLogger(__name__)
LEDGER = NAME  # one line per process a cell ran: cell, cpu_s, wall_s, exit code


@dataclass(frozen=True)
class Slot:
    """Where one job runs: its torch threads and, with CUDA, its GPU (None: CPU)."""

    threads: int
    gpu: int | None = None


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "runs" / cell.name


def state(study: Study, cell: Cell, out: Path) -> str:
    """``done``, ``partial`` (resumes from its newest checkpoint) or ``new``; one line if the folder holds another run."""
    folder = cell_dir(out, cell)
    if not (folder / "config.yaml").is_file():
        return "new"
    saved = _flat(load_config(folder / "config.yaml", []).model_dump(mode="json"))
    want = _flat(study.cell_config(cell).model_dump(mode="json"))
    for key in sorted(set(saved) | set(want)):
        if not key.startswith("output.") and saved.get(key) != want.get(key):
            raise ConfigError(f"study {study.name}: {folder} was run with {key}={saved.get(key)!r}, the study now sets {want.get(key)!r} "
                              "(accepted: the study's own settings; move that folder away to run the cell again)")
    return "done" if finished(folder, want["federation.rounds"]) else "partial"


def argv(study: Study, cell: Cell, out: Path) -> list[str]:
    """The ``fedlora run`` command of a cell: a new run into its folder, or the resume of the one there."""
    folder = cell_dir(out, cell)
    base = [sys.executable, "-m", "fedlora.cli", "run"]
    if (folder / "config.yaml").is_file() and (not (folder / "metrics.jsonl").is_file() or any((folder / "checkpoints").glob("round-*"))):
        return [*base, "--resume", str(folder)]
    if (folder / "config.yaml").is_file():  # rounds recorded but no checkpoint to resume them from (a copy without them): again
        shutil.rmtree(folder)
    if folder.exists():  # killed before its config was written: nothing of it to keep
        shutil.rmtree(folder)
    return [*base, str(study.config), "output.save_final=false", *study.overrides, *cell.overrides, f"output.dir={folder}"]


def environment(slot: Slot) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(slot.threads), MKL_NUM_THREADS=str(slot.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", FEDLORA_PARENT=str(os.getpid()))
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
    return env


def run_process(args: list[str], env: dict[str, str], log_path: Path, cwd: str | None = None) -> tuple[int, float, float]:
    """Run one process to its end; its exit code, CPU seconds (its own and its children's) and wall seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("a") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, time.perf_counter() - t0


def slots(jobs: int, threads: int | None = None) -> list[Slot]:
    """``jobs`` slots sharing this machine's CPUs (and its GPUs in turn, when CUDA has any)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = threads or max(1, cpus // jobs)
    gpus = _cuda_devices()
    return [Slot(share, i % gpus if gpus else None) for i in range(jobs)]


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def run_cell(study: Study, cell: Cell, out: Path, slot: Slot) -> dict[str, Any]:
    """Run (or resume) one cell in this machine's slot; its line of the CPU ledger."""
    folder = cell_dir(out, cell)
    env = {**environment(slot), "FEDLORA_LEDGER": str((out / LEDGER).resolve()), "FEDLORA_CELL": cell.name}
    rc, cpu_s, wall_s = run_process(argv(study, cell, out), env, out / "logs" / f"{cell.name}.log")
    line = {"cell": cell.name, "exit": rc, "cpu_s": round(cpu_s, 1), "wall_s": round(wall_s, 1), "threads": slot.threads, "load": load_average()}
    append(out / LEDGER, line)
    if rc == 0 and (folder / "checkpoints").is_dir():
        shutil.rmtree(folder / "checkpoints")  # only a resume needs them; the record is config, metrics and summary
    return line


def selected(study: Study, only: str | None) -> list[Cell]:
    """The study's cells, or those whose name matches one of ``only``'s comma-separated globs (``steps2-fedplora-seed[01]``)."""
    cells = study.cells()
    if not only:
        return cells
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"--only: {only!r} matches no cell of {study.name} (accepted: globs over cell names, e.g. {cells[0].name})")
    return chosen


def run_study(study: Study, out: Path, jobs: int = 1, threads: int | None = None, ray_address: str | None = None,
              only: str | None = None) -> list[dict[str, Any]]:
    """Run every selected cell that is not done; the ledger lines of what ran. Failed cells are reported, not retried."""
    todo = [c for c in selected(study, only) if state(study, c, out) != "done"]
    out.mkdir(parents=True, exist_ok=True)
    log.info("study %s: %d of %d cells to run (%s)", study.name, len(todo), len(study.cells()),
             f"Ray at {ray_address}" if ray_address else f"{jobs} at a time")
    if not todo:
        return []
    if ray_address:
        return _run_on_ray(study, out, todo, ray_address, threads or 1)
    free = slots(jobs, threads)
    lines: list[dict[str, Any]] = []

    def work(i: int, cell: Cell) -> dict[str, Any]:
        slot = free[i % len(free)]
        log.info("  %s: %s", cell.name, "resuming" if (cell_dir(out, cell) / "config.yaml").is_file() else "starting")
        line = run_cell(study, cell, out, slot)
        log.info("  %s: %s after %.0f s (%.0f CPU s)", cell.name, "done" if line["exit"] == 0 else f"FAILED (exit {line['exit']}, see logs/)",
                 line["wall_s"], line["cpu_s"])
        return line

    with ThreadPoolExecutor(max_workers=len(free)) as pool:  # job i % jobs always uses slot i % jobs: one cell per slot at a time
        lines = list(pool.map(lambda ic: work(*ic), _interleave(todo, len(free))))
    return lines


def _interleave(cells: list[Cell], jobs: int) -> list[tuple[int, Cell]]:
    return [(i % jobs, c) for i, c in enumerate(cells)]


def _run_on_ray(study: Study, out: Path, todo: list[Cell], address: str, cpus: int) -> list[dict[str, Any]]:
    """Each cell a Ray task asking for ``cpus`` CPUs (and one GPU where the cluster has any); run folders must be on storage every node sees."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray: Ray is not installed (accepted: pip install -e \".[simulation]\", or run without --ray)") from None
    ray.init(address=address, log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0

    @ray.remote(num_cpus=cpus, num_gpus=gpus)
    def remote(args: list[str], env: dict[str, str], log_path: str, cwd: str) -> tuple[int, float, float]:
        env = {**env, "FEDLORA_PARENT": str(os.getpid())}  # the cell ends with the Ray worker that runs it
        return run_process(args, env, Path(log_path), cwd)

    here = os.getcwd()  # the study's paths as given, from the folder the study started in (on storage every node sees)
    ledger = str((out / LEDGER).resolve())
    futures = {c.name: remote.remote(argv(study, c, out), {**environment(Slot(cpus)), "FEDLORA_LEDGER": ledger, "FEDLORA_CELL": c.name},
                                     str((out / "logs" / f"{c.name}.log").resolve()), here)
               for c in todo}
    lines = []
    for name, fut in futures.items():
        rc, cpu_s, wall_s = ray.get(fut)
        line = {"cell": name, "exit": rc, "cpu_s": round(cpu_s, 1), "wall_s": round(wall_s, 1), "threads": cpus, "load": None, "ray": address}
        append(out / LEDGER, line)
        log.info("  %s: %s after %.0f s", name, "done" if rc == 0 else f"FAILED (exit {rc})", wall_s)
        lines.append(line)
    ray.shutdown()
    return lines


def cpu_hours(out: Path) -> dict[str, tuple[float, bool]]:
    """Per cell: CPU hours from the ledger, every process it took (resumes included), and whether all are known
    (a line with ``cpu_s: null`` records a process whose CPU time was not measured: the hours are then a lower bound)."""
    hours: dict[str, tuple[float, bool]] = {}
    ledger = out / LEDGER
    for line in ledger.read_text().splitlines() if ledger.is_file() else []:
        rec = json.loads(line)
        h, known = hours.get(rec["cell"], (0.0, True))
        hours[rec["cell"]] = (h + (rec["cpu_s"] or 0.0) / 3600, known and rec["cpu_s"] is not None)
    return hours


# ---- the estimate of --dry-run --------------------------------------------------------------------

def round_times(folder: Path) -> tuple[float, float, float | None] | None:
    """(seconds of a training round, of the first evaluation, of a mid-run one if recorded) from a run's metrics.jsonl."""
    try:
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except OSError:
        return None
    if len(lines) < 2 or lines[0]["round"] != 0:
        return None
    first = lines[0]["wall_s"]
    trained = [m["wall_s"] for m in lines[1:] if "eval" not in m]
    train = sum(trained) / len(trained) if trained else max(lines[1]["wall_s"] - first, 0.0)
    mid = [m["wall_s"] - train for m in lines[1:-1] if "eval" in m]
    return train, first, (sum(mid) / len(mid) if mid else None)


def estimate(study: Study, out: Path, slot: Slot) -> dict[str, dict[str, Any]]:
    """Seconds each unfinished cell should take, from its setting's recorded rounds or else a timed first round (one per setting).

    A run costs its start, its training rounds and its evaluations: the first and last score every split,
    the ones between only the global split when ``eval.client_splits: ends``.
    """
    per_setting: dict[str, tuple[float, float, float | None, float, str]] = {}
    cells = study.cells()
    states = {c.name: state(study, c, out) for c in cells}
    for cell in cells:
        if cell.setting in per_setting or states[cell.name] == "done":
            continue
        times = next((t for c in cells if c.setting == cell.setting and (t := round_times(cell_dir(out, c)))), None)
        if times:
            per_setting[cell.setting] = (*times, 30.0, "recorded")
            continue
        with tempfile.TemporaryDirectory(prefix="fedlora-estimate-") as tmp:
            folder = Path(tmp) / "run"
            args = [sys.executable, "-m", "fedlora.cli", "run", str(study.config), "output.save_final=false",
                    *study.overrides, *cell.overrides, "federation.rounds=1", f"output.dir={folder}"]
            rc, _, wall = run_process(args, environment(slot), Path(tmp) / "log")
            times = round_times(folder) if rc == 0 else None
            if times is None:
                raise ConfigError(f"study {study.name}: the timed first round of {cell.setting} failed: "
                                  f"{(Path(tmp) / 'log').read_text().strip().splitlines()[-1]}")
            per_setting[cell.setting] = (*times, max(wall - 2 * times[1] - times[0], 0.0), "timed")
    result = {}
    for cell in cells:
        if cell.setting not in per_setting or states[cell.name] == "done":
            continue
        train, first, mid, startup, how = per_setting[cell.setting]
        cfg = study.cell_config(cell)
        if mid is None:
            mid = first if cfg.eval.client_splits == "every" else first / (1 + cfg.federation.num_clients)
        rounds, every = cfg.federation.rounds, cfg.eval.every
        between = len([t for t in range(1, rounds) if t % every == 0])
        done = _rounds_done(cell_dir(out, cell))
        left = (rounds - done) * train + (between * mid) * (rounds - done) / rounds + first * (1 + (done == 0)) + startup
        result[cell.name] = {"seconds": left, "how": how, "round_s": train, "eval_s": first}
    return result


def _rounds_done(folder: Path) -> int:
    try:
        return max(int(p.name.split("-")[1]) for p in (folder / "checkpoints").glob("round-*") if p.is_dir())
    except (ValueError, IndexError):
        return 0
