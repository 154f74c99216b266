"""Run every registered method on one config (same split, same seed) and tabulate the results.

    python bench/methods_table.py configs/tiny.yaml --out runs/methods-tiny [key=value ...]

Methods that need one rank for everyone (fedit, ffa) run with lora.rank = the smallest
client rank (every client can afford it), or --homogeneous-rank R. Writes <out>/<method>/ run folders,
<out>/table.md and <out>/table.json; a method whose run folder already has summary.json is
not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from fedlora.config import load_config
from fedlora.methods import REGISTRY
from fedlora.methods.registry import needs_one_rank




def run(config: str, out: Path, name: str, overrides: list[str]) -> dict:
    folder = out / name
    summary = folder / "summary.json"
    if not summary.is_file():
        if folder.exists():
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        cmd = [sys.executable, "-m", "fedlora.cli", "run", config, f"federation.method={name}", f"output.dir={folder}", *overrides]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(summary.read_text())


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def accuracy(folder: Path) -> dict:
    """Global accuracy before and after, and the global split's majority-class rate (classification only)."""
    evals = [m["eval"]["global"] for m in metrics(folder) if "eval" in m]
    if "accuracy" not in evals[0]:
        return {}
    return {"acc": (evals[0]["accuracy"], evals[-1]["accuracy"]), "chance": evals[0].get("majority")}


def round_seconds(folder: Path) -> float:
    """Mean wall time of a training round, its evaluation included (round 0 is evaluation only)."""
    rounds = [m["wall_s"] for m in metrics(folder) if m["round"] > 0]
    return sum(rounds) / len(rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--homogeneous-rank", type=int, default=None)
    ap.add_argument("--methods", default=",".join(REGISTRY))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()  # overrides may follow the options
    cfg = load_config(args.config, args.overrides)
    ranks = cfg.client_ranks()
    one_rank = args.homogeneous_rank or min(ranks)
    rows = []
    for name in args.methods.split(","):
        extra = [f"lora.rank={one_rank}"] if needs_one_rank(name, ranks) else []
        s = run(args.config, args.out, name, [*args.overrides, *extra])
        rows.append({
            "method": name, "ranks": f"all {one_rank}" if extra else ",".join(map(str, ranks)),
            "loss_before": s["global_loss"]["before"], "loss_after": s["global_loss"]["after"],
            **accuracy(args.out / name),
            "mb_up": s["bytes_up"] / 1e6, "mb_down": s["bytes_down"] / 1e6,
            "agg_noise": s["agg_noise_mean"], "init_noise": s["init_noise_mean"], "wall_s": s["wall_s"],
            "round_s": round_seconds(args.out / name),
        })
    fmt = lambda x, p=4: "—" if x is None else f"{x:.{p}f}"  # noqa: E731
    acc = "acc" in rows[0]
    lines = [
        "| method | ranks | global loss before → after |" + (" global accuracy before → after (chance) |" if acc else "")
        + " MB up | MB down | mean agg_noise | mean init_noise | s / round | wall s |",
        "|---|---|---|" + ("---|" if acc else "") + "---|---|---|---|---|---|",
    ]
    for r in rows:
        accuracy_cell = f" {fmt(r['acc'][0], 3)} → {fmt(r['acc'][1], 3)} ({fmt(r['chance'], 3)}) |" if acc else ""
        lines.append(
            f"| `{r['method']}` | {r['ranks']} | {fmt(r['loss_before'])} → {fmt(r['loss_after'])} |{accuracy_cell} {fmt(r['mb_up'], 1)} | "
            f"{fmt(r['mb_down'], 1)} | {fmt(r['agg_noise'], 3)} | {fmt(r['init_noise'], 3)} | {fmt(r['round_s'], 0)} | {fmt(r['wall_s'], 0)} |"
        )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    options = f" --homogeneous-rank {args.homogeneous_rank}" if args.homogeneous_rank else ""
    footer = f"\nCommand: `python bench/methods_table.py {args.config} --out {args.out}{options} {' '.join(args.overrides)}`; machine: {machine}.\n"
    (args.out / "table.md").write_text("\n".join(lines) + "\n" + footer)
    (args.out / "table.json").write_text(json.dumps({"rows": rows, "machine": machine}, indent=2))
    print("\n".join(lines) + footer)


if __name__ == "__main__":
    main()
