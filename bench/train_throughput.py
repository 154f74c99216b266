"""Benchmark 3: fedlora's local training loop against a plain PEFT loop, same process, same work, at each precision.

Both train client 0 of ``configs/default.yaml`` (SmolLM2-135M-Instruct, q_proj/v_proj) with a
fresh rank-64 LoRA (lora_alpha 128) for the same steps over the same length-grouped batches
(the trainer's own seed), AdamW at the config's learning rate, gradient clipping at the
config's norm. The fedlora side is ``LocalTrainer.fit`` on a FLoRA plan (adapter attach,
training, factor read-out, detach); the plain side is ``get_peft_model``, a loop calling the
model with ``labels=`` (Hugging Face's own mean loss), and ``unload``. Runs alternate, so load
changes hit both; the ratio is fedlora tokens/s over plain tokens/s (real, non-pad tokens).
Both sides run once in float32 and once under bfloat16 autocast (``train.precision``), so
neither gains from the precision alone.

    .venv/bin/python bench/train_throughput.py [--quick] [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import benchlib
from fedlora.config import load_config, packaged_config
from fedlora.data.batching import collate, length_grouped_batches
from fedlora.ops.lowrank import seeded_generator
from fedlora.federation.experiment import prepare
from fedlora.train.precision import autocast, resolve


def plain_peft(exp, train: list, rank: int, scale: float, steps: int, seed: int, dtype: torch.dtype | None = None) -> tuple[float, int]:
    """A textbook PEFT loop on the same base model; (seconds, real tokens)."""
    cfg = exp.cfg.train
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(exp.host.model, LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=exp.cfg.lora.target_modules, bias="none"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = length_grouped_batches([len(e.input_ids) for e in train], cfg.batch_size, seed)
    model.train()
    tokens = 0
    for step in range(steps):
        b = collate([train[i] for i in batches[step % len(batches)]], exp.tokenizer.pad_token_id)
        with autocast(dtype, exp.device):
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += b.real_tokens
    model.eval()
    exp.host.model = model.unload()
    exp.host.model.requires_grad_(False)
    return time.perf_counter() - t0, tokens


def fedlora_fit(exp, train: list) -> tuple[float, int]:
    plan = exp.method.plan(0, 1)
    t0 = time.perf_counter()
    _, stats = exp.trainer.fit(plan, train)
    return time.perf_counter() - t0, stats.real_tokens


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=benchlib.QUICK, help="3 steps, 2 repeats")
    ap.add_argument("--config", default=str(packaged_config("default")))
    ap.add_argument("--steps", type=int, default=None, help="local steps per run (default 8, quick 3)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each side after one warm-up each (default 3, quick 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="float32,bfloat16", help="comma-separated train.precision values, each measured for both sides")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    load = benchlib.uptime()
    torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 8)
    repeats = args.repeats or (2 if args.quick else 3)
    cfg = load_config(args.config, ["federation.method=flora", f"train.local_steps={steps}", *args.overrides])
    torch.manual_seed(cfg.seed)
    exp = prepare(cfg)
    train = exp.clients[0].train
    rank, scale = cfg.client_ranks()[0], cfg.client_scales()[0]
    seed = int(seeded_generator(cfg.seed, 1, 0).initial_seed() % (2**31))  # the trainer's batch seed for (round 1, client 0)
    results: dict = {
        "config": args.config, "overrides": args.overrides, "model": str(exp.model_dir), "client": 0, "rank": rank, "scale": scale,
        "steps": steps, "batch_size": cfg.train.batch_size, "repeats": repeats, "precisions": {},
    }
    targets = []
    for name in args.precisions.split(","):
        dtype = resolve(name, exp.device)
        exp.trainer.compute_dtype = dtype  # the trainer's train.precision, set per pass
        fed, plain = [], []
        fedlora_fit(exp, train), plain_peft(exp, train, rank, scale, steps, seed, dtype)  # warm-up, untimed
        for _ in range(repeats):
            fed.append(fedlora_fit(exp, train))
            plain.append(plain_peft(exp, train, rank, scale, steps, seed, dtype))
        assert {t for _, t in fed} == {t for _, t in plain}, "both sides must see the same tokens"
        fed_tps = benchlib.median([t / s for s, t in fed])
        plain_tps = benchlib.median([t / s for s, t in plain])
        results["precisions"][name] = {
            "tokens_per_run": fed[0][1], "fedlora_s": [s for s, _ in fed], "plain_peft_s": [s for s, _ in plain],
            "fedlora_tokens_per_s": fed_tps, "plain_peft_tokens_per_s": plain_tps, "ratio": fed_tps / plain_tps,
        }
        print(f"{name:>8}: fedlora {fed_tps:8.1f} tok/s · plain PEFT {plain_tps:8.1f} tok/s · ratio {fed_tps / plain_tps:.3f}")
        targets.append(benchlib.target(f"fedlora / plain PEFT tokens per second, {name}", ">=", 0.95, fed_tps / plain_tps))
    benchlib.write("train_throughput", args.quick, load, targets, results, args.out)
    return results


if __name__ == "__main__":
    main()
