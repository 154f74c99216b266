"""Benchmark 4: peak resident memory of one round against the number of sampled clients.

Each client count runs as its own ``fedlora run`` subprocess (``os.wait4`` gives that child's
``ru_maxrss``): ``configs/classification.yaml`` (all-MiniLM-L6-v2, Rotten Tomatoes) on the same
12,000 examples for every count, IID over N clients (about 9 training examples each at N = 1000),
the config's ranks cycled over the clients, FLoRA, every client sampled, one round of one local
step at batch 4, evaluation capped at 4 examples per split. Target: 1000 clients ≤ 1.3 × 10 clients.

    .venv/bin/python bench/memory_clients.py [--quick] [--clients 10,100,1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

RANKS = (16, 16, 8, 8, 8, 4, 4, 4, 2, 2)  # configs/classification.yaml, cycled


def overrides(n: int, out: Path) -> list[str]:
    ranks = ",".join(str(RANKS[k % len(RANKS)]) for k in range(n))
    return [
        f"federation.num_clients={n}", f"lora.ranks=[{ranks}]", "federation.method=flora", "federation.rounds=1", "federation.fraction=1.0",
        "data.partition=iid", "data.max_examples=12000", "train.local_steps=1", "train.batch_size=4", "train.micro_batch_size=4",
        "eval.max_examples=4", "output.save_final=false", f"output.dir={out}",
    ]


def measure(n: int, config: str, threads: int) -> dict:
    """One child process for one client count: its peak RSS (MiB) and wall seconds."""
    with tempfile.TemporaryDirectory(prefix=f"fedlora-mem-{n}-") as tmp:
        cmd = [sys.executable, "-m", "fedlora.cli", "run", config, *overrides(n, Path(tmp) / "run")]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        err = child.stderr.read() if child.stderr else ""
        if child.returncode != 0:
            raise RuntimeError(f"{n} clients: fedlora run failed ({child.returncode}): {err[-2000:]}")
    return {"clients": n, "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=benchlib.QUICK, help="10 and 100 clients")
    ap.add_argument("--clients", default=None, help="comma-separated client counts (default 10,100,1000; quick 10,100)")
    ap.add_argument("--config", default="configs/classification.yaml")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    load = benchlib.uptime()
    counts = [int(x) for x in (args.clients or ("10,100" if args.quick else "10,100,1000")).split(",")]
    rows: list[dict] = []
    results: dict = {}
    for n in counts:  # the JSON is rewritten after every count, so a stopped run keeps what it measured
        rows.append(measure(n, args.config, args.threads))
        print(f"{n:5d} clients: peak RSS {rows[-1]['peak_rss_mib']:8.1f} MiB  ({rows[-1]['wall_s']:.0f} s)", flush=True)
        base, top = rows[0], rows[-1]
        ratio = top["peak_rss_mib"] / base["peak_rss_mib"]
        results = {"config": args.config, "overrides_for_n_clients": overrides(n, Path("<tmp>"))[2:], "counts_planned": counts, "rows": rows,
                   "ratio_largest_to_smallest": ratio}
        metric = f"peak RSS {top['clients']} clients / {base['clients']} clients"
        benchlib.write("memory_clients", args.quick, load, [benchlib.target(metric, "<=", 1.3, ratio)], results, args.out)
    return results


if __name__ == "__main__":
    main()
