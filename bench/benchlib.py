"""What every benchmark shares: the machine record, timing, the target line and the JSON file.

Every result file has the same top-level shape: ``benchmark``, ``command``, ``quick``,
``machine`` (nproc, CPU model, torch version and threads, the load before and after),
``target`` ({metric, op, value, measured, met}) and the benchmark's own ``results``. Absolute
times on a shared machine are not comparable between runs; the ratios are measured side by side
in one process and are what the targets read.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
"""``BENCH_QUICK=1``: every benchmark runs its small configuration (``--quick`` does the same)."""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def uptime() -> str:
    """The ``uptime`` line (load averages of every job on the machine, not only this one)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine(load_before: str) -> dict[str, Any]:
    return {
        "uname_m": platform.machine(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "uptime_before": load_before,
        "uptime_after": uptime(),
        "shared": "2 cores shared with other jobs: absolute times are not comparable across runs, ratios within one run are",
    }


def timed(fn: Callable[[], Any], repeats: int, budget_s: float = float("inf")) -> tuple[list[float], Any]:
    """Wall-clock seconds of ``repeats`` calls (fewer once ``budget_s`` is spent, at least one) and the last result."""
    times: list[float] = []
    out = None
    while len(times) < repeats and (not times or sum(times) < budget_s):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def target(metric: str, op: str, value: float, measured: float) -> dict[str, Any]:
    """A target such as ratio ≤ 1.5 and whether the measurement meets it."""
    met = measured <= value if op == "<=" else measured >= value
    return {"metric": metric, "op": op, "value": value, "measured": measured, "met": bool(met)}


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write(name: str, quick: bool, load_before: str, targets: list[dict[str, Any]], results: dict[str, Any], out: Path | None = None) -> Path:
    """bench/results/<name>[_quick].json in the common shape; prints each target next to its measurement."""
    path = out or RESULTS / f"{name}{'_quick' if quick else ''}.json"
    doc = {
        "benchmark": name,
        "command": command(),
        "quick": quick,
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(load_before),
        "targets": targets,
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    for t in targets:
        verdict = "met" if t["met"] else "NOT met"
        print(f"[{name}] {t['metric']}: {t['measured']:.4g} (target {t['op']} {t['value']:g}) {verdict}")
    print(f"[{name}] wrote {path}")
    return path


def build_hetero_or_homo(name: str, layers: dict, clients: int, pattern: list[int], homogeneous: int, scale: float):
    """The method at the heterogeneous rank pattern where it declares it accepts one (``ranks``), else every client at ``homogeneous``."""
    from fedlora.methods import Setup, build_method, method_class

    if method_class(name).ranks == "any":
        ranks = {k: pattern[k % len(pattern)] for k in range(clients)}
    else:
        ranks = {k: homogeneous for k in range(clients)}
    return build_method(name, Setup(layers, ranks, {k: scale for k in ranks}, seed=0))
