"""Benchmark 7: fedlora's local training in bfloat16 (autocast, float32 master weights) against float32, same process.

Client 0 of ``configs/default.yaml`` (SmolLM2-135M-Instruct, q_proj/v_proj, a fresh rank-64 LoRA)
trains the same steps over the same batches with ``train.precision`` float32 and bfloat16,
alternating, so load changes hit both. Reported: real (non-pad) tokens per second of each, their
ratio, the training loss of each after the steps (mean over them), and, as the hardware's ceiling,
the bfloat16 / float32 speed of a 1024 × 1024 matmul in the same process.
Targets: ratio ≥ 1.5, mean loss within 1 % of float32's.

    .venv/bin/python bench/precision.py [--quick] [--steps 8] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import benchlib
from fedlora.config import load_config, packaged_config
from fedlora.federation.experiment import prepare


def matmul_ratio(repeats: int = 20, n: int = 1024) -> float:
    """bfloat16 / float32 GEMM speed (the ceiling of what autocast can gain)."""
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    times = {}
    for name, (a, b) in (("f32", (a32, b32)), ("bf16", (a16, b16))):
        a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        times[name] = time.perf_counter() - t0
    return times["f32"] / times["bf16"]


def fit(exp, train, dtype) -> tuple[float, int, float]:
    exp.trainer.compute_dtype = dtype
    plan = exp.method.plan(0, 1)
    t0 = time.perf_counter()
    update, stats = exp.trainer.fit(plan, train)
    return time.perf_counter() - t0, stats.real_tokens, stats.train_loss


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=benchlib.QUICK, help="3 steps, 2 repeats")
    ap.add_argument("--config", default=str(packaged_config("default")))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    load = benchlib.uptime()
    torch.set_num_threads(args.threads)
    steps, repeats = args.steps or (3 if args.quick else 8), args.repeats or (2 if args.quick else 3)
    cfg = load_config(args.config, ["federation.method=flora", f"train.local_steps={steps}"])
    torch.manual_seed(cfg.seed)
    exp = prepare(cfg)
    train = exp.clients[0].train
    fit(exp, train, None), fit(exp, train, torch.bfloat16)  # warm-up, untimed
    runs = {"float32": [], "bfloat16": []}
    ceiling = []
    for _ in range(repeats):
        runs["float32"].append(fit(exp, train, None))
        runs["bfloat16"].append(fit(exp, train, torch.bfloat16))
        ceiling.append(matmul_ratio())
    tps = {k: benchlib.median([t / s for s, t, _ in v]) for k, v in runs.items()}
    loss = {k: v[0][2] for k, v in runs.items()}  # the same steps every repeat: the same loss
    ratio, loss_gap = tps["bfloat16"] / tps["float32"], abs(loss["bfloat16"] - loss["float32"]) / loss["float32"]
    results = {"config": args.config, "steps": steps, "repeats": repeats, "rank": cfg.client_ranks()[0], "tokens_per_run": runs["float32"][0][1],
               "seconds": {k: [s for s, _, _ in v] for k, v in runs.items()}, "tokens_per_s": tps, "ratio": ratio,
               "train_loss": loss, "loss_rel_gap": loss_gap, "matmul_bf16_over_f32": benchlib.median(ceiling),
               "cpu_has_bf16": __import__("fedlora.train.precision", fromlist=["x"]).cpu_has_bf16()}
    print(f"float32 {tps['float32']:.1f} tok/s · bfloat16 {tps['bfloat16']:.1f} tok/s · ratio {ratio:.3f} · "
          f"loss {loss['float32']:.4f} vs {loss['bfloat16']:.4f} · matmul ceiling {results['matmul_bf16_over_f32']:.2f}")
    targets = [benchlib.target("bfloat16 / float32 tokens per second", ">=", 1.5, ratio),
               benchlib.target("relative gap of the mean training loss", "<=", 0.01, loss_gap)]
    benchlib.write("precision", args.quick, load, targets, results, args.out)
    return results


if __name__ == "__main__":
    main()
