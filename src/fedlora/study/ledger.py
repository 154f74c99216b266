"""The study's CPU ledger, ``cpu.jsonl``: one line per process a cell took, with its CPU seconds.

The study writes the line of a process that ended (its CPU from ``os.wait4``, children included).
A cell that ends *with* the study (SIGTERM from its parent-death signal) writes its own line on the
way out, so the CPU hours of an interrupted and resumed cell count every process, not only the last.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

NAME = "cpu.jsonl"


def append(path: Path, line: dict[str, Any]) -> None:
    with path.open("a") as f:  # one short line per write: appends from several processes do not interleave
        f.write(json.dumps(line) + "\n")


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def record_when_terminated(ledger: str, cell: str) -> None:
    """In a cell's process: on SIGTERM, add this process's CPU seconds to the ledger, then exit as SIGTERM would."""
    start = time.perf_counter()

    def on_term(signum: int, frame: Any) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        append(Path(ledger), {"cell": cell, "exit": -signum, "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                              "wall_s": round(time.perf_counter() - start, 1), "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
                              "load": load_average(), "ended_with_the_study": True})
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
