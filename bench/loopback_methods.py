"""Methods over Flower on loopback against the simulator's runs of the same config and seed.

A real SuperLink and three SuperNodes (``fedlora.flower.launch.LocalFederation``, one torch thread
each) run ``configs/tiny.yaml`` (2 rounds, seed 0) for each method named; each round's global and
per-client held-out loss, byte counters, weights and agg_noise are compared with the seed-0 run
of a ``fedlora compare configs/tiny.yaml federation.rounds=2 --output STUDY`` folder. One-rank
methods run at rank 1, as ``compare`` runs them there (the clients' smallest rank).

    .venv/bin/python bench/loopback_methods.py fedex rolora florist --study runs/study/lm-2025 [--out runs/loopback]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedlora.flower.launch import LocalFederation
from fedlora.methods import method_class

ROOT = Path(__file__).resolve().parents[1]


def one_rank(method: str) -> bool:
    """Whether the method declares one rank for every client (``ranks = "one"``)."""
    return method_class(method).ranks == "one"


def compare(flower: list[dict], sim: list[dict]) -> list[dict]:
    rows = []
    for f, s in zip(flower, sim, strict=True):
        rows.append({
            "round": f["round"], "loss_equal": f["eval"]["global"]["loss"] == s["eval"]["global"]["loss"],
            "clients_equal": all(f["eval"]["clients"][k]["loss"] == v["loss"] for k, v in s["eval"]["clients"].items()),
            "bytes_equal": (f.get("bytes_up"), f.get("bytes_down")) == (s.get("bytes_up"), s.get("bytes_down")),
            "weights_equal": f.get("weights") == s.get("weights"), "agg_noise_equal": f.get("agg_noise") == s.get("agg_noise"),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="+")
    ap.add_argument("--study", type=Path, required=True, help="a `fedlora compare` output folder with <method>-seed0 runs")
    ap.add_argument("--out", type=Path, default=Path("runs/loopback"))
    args = ap.parse_args(argv)
    out = {}
    with LocalFederation(args.out.resolve() / "federation", 3, threads_per_node=1, server_threads=1) as fed:
        for m in args.methods:
            ranks = ["lora.ranks=[1,1,1]"] if one_rank(m) else []
            t0 = time.time()
            overrides = ["federation.rounds=2", f"federation.method={m}", "seed=0", "output.save_final=false", *ranks]
            fed.run(ROOT / "configs" / "tiny.yaml", args.out.resolve() / m, overrides, round_timeout=1200)
            read = lambda p: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]  # noqa: E731
            rows = compare(read(args.out / m / "metrics.jsonl"), read(args.study / "runs" / f"{m}-seed0" / "metrics.jsonl"))
            out[m] = {"seconds": round(time.time() - t0), "rounds": rows, "equal": all(all(v for k, v in r.items() if k != "round") for r in rows)}
            print(m, json.dumps(out[m]), flush=True)
    (args.out / "summary.json").write_text(json.dumps(out, indent=1))
    return 0 if all(r["equal"] for r in out.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
