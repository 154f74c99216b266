"""Benchmark 1: one server round of every method on Llama-2-7B LoRA shapes, against a bare-torch floor.

Shapes: q, k, v, o at 4096 × 4096 in each of 32 blocks (128 layers), 10 clients with ranks
64,32,16,16,8,8,4,4,4,4 (Σr = 160), synthetic float32 factors. Methods that need one rank
(fedit, ffa, fedsa, fedex, rolora) get rank 16 for everyone (the same Σr = 160, so the same upload volume);
``centralized`` aggregates one rank-64 update. ``full`` uploads a 4096 × 4096 weight per layer
per client (64 MiB each), so it runs on ``--full-layers`` layers only and its seconds are
scaled to 128 layers (linear: every method loops over layers independently).

Measured: ``aggregate`` (plus FlexLoRA's truncated SVD, which its next plans need), median of
repeats on a fresh method object each time. The floor, timed in the same loop, is bare torch
doing what the method cannot avoid: one pass over every uploaded factor into the output it must
produce (the stack for FLoRA/FlexLoRA, a weighted accumulation for the averaging methods, a copy
for the references) plus the unavoidable GEMMs (FlexLoRA: two QRs, the Σr × Σr core SVD and the
rank-64 products; HETLoRA: the r × r Gram matrices of its norm weights). The plans for all ten
clients of the next round are timed too and reported beside it (no target).

    .venv/bin/python bench/aggregation.py [--quick] [--blocks 32] [--d 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable

import torch

import benchlib
from fedlora.methods import ClientUpdate, Factors, Setup, build_method
from fedlora.ops.lowrank import kaiming_A, seeded_generator
from fedlora.ops.weights import data_weights

RANKS = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)
EXAMPLES = (120, 80, 60, 60, 40, 40, 20, 20, 20, 20)
HOMOGENEOUS = 16  # fedit, ffa: one rank with the same Σr = 160
SCALE = 2.0
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_7B_LAYERS = 32 * len(PROJ)
KIND = {  # method → (updates, floor)
    "flora": ("hetero", "stack"), "flexlora": ("hetero", "stack"), "zeropad": ("hetero", "accumulate"),
    "hetlora": ("hetero", "accumulate"), "fedplora": ("hetero", "accumulate"), "local": ("hetero", "copy"),
    "fedit": ("homo", "accumulate"), "ffa": ("homo", "accumulate_B"), "centralized": ("pooled", "copy"), "full": ("full", "accumulate_B"),
    "florist": ("hetero", "stack"), "fedsa": ("homo", "accumulate_A"), "fedex": ("homo", "residual"), "rolora": ("homo", "accumulate_B"),
}
"""rolora aggregates its round 1 (a B round); fedex's floor adds the K centred pairs of its residual."""


def layer_shapes(blocks: int, d: int) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.self_attn.{p}": (d, d) for i in range(blocks) for p in PROJ}


def make_updates(layers: dict[str, tuple[int, int]], ranks: list[int], seed: int = 0) -> list[ClientUpdate]:
    """Client k: B_k ~ N(0, 0.01²) (d_out × r_k) as after training, A_k Kaiming-uniform (r_k × d_in)."""
    updates = []
    for k, r in enumerate(ranks):
        gen = seeded_generator(seed, k)
        factors = {n: Factors(B=torch.randn(d_out, r, generator=gen) * 0.01, A=kaiming_A(r, d_in, gen)) for n, (d_out, d_in) in layers.items()}
        updates.append(ClientUpdate(client=k, num_examples=EXAMPLES[k], scale=SCALE, factors=factors))
    return updates


def full_updates(layers: dict[str, tuple[int, int]], seed: int = 0) -> list[ClientUpdate]:
    """``full``: B_k = the client's dense weight delta (d_out × d_in), A = one shared identity (never uploaded)."""
    eyes = {n: torch.eye(d_in) for n, (_, d_in) in layers.items()}
    return [
        ClientUpdate(k, EXAMPLES[k], 1.0, {n: Factors(B=torch.randn(d_out, d_in, generator=seeded_generator(seed, k)) * 1e-3, A=eyes[n]) for n, (d_out, d_in) in layers.items()})
        for k in range(len(RANKS))
    ]


def floor_fn(kind: str, updates: list[ClientUpdate], weights: list[float], method: str) -> Callable[[], object]:
    """Bare torch: one pass over the uploads into the required output, plus the method's unavoidable GEMMs."""
    names = list(updates[0].factors)

    def stack() -> object:
        out = {}
        for n in names:
            fs = [u.factors[n] for u in updates]
            total = sum(f.rank for f in fs)
            B = torch.empty(fs[0].B.shape[0], total)  # (d_out × Σr)
            A = torch.empty(total, fs[0].A.shape[1])  # (Σr × d_in)
            i = 0
            for f, u, p in zip(fs, updates, weights):
                B[:, i : i + f.rank].copy_(f.B)
                torch.mul(f.A, u.scale * p, out=A[i : i + f.rank])
                i += f.rank
            if method in ("flexlora", "florist"):  # the truncated SVD at the widest rank: QR, QR, core SVD, two products
                q_b, r_b = torch.linalg.qr(B)
                q_a, r_a = torch.linalg.qr(A.T)
                u_c, sv, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
                R = max(f.rank for f in fs)
                B, A = q_b @ (u_c[:, :R] * sv[:R]), vh_c[:R] @ q_a.T
            out[n] = (B, A)
        return out

    def accumulate(with_A: bool, with_B: bool = True) -> object:
        out = {}
        for n in names:
            fs = [u.factors[n] for u in updates]
            R = max(f.rank for f in fs)
            if not with_B:  # fedsa: Σ p_k A_k only
                A = torch.zeros(R, fs[0].A.shape[1])
                for f, p in zip(fs, weights):
                    A.add_(f.A, alpha=p)
                out[n] = (None, A)
                continue
            B = torch.zeros(fs[0].B.shape[0], R if with_A else fs[0].B.shape[1])
            A = torch.zeros(R, fs[0].A.shape[1]) if with_A else None
            count = torch.zeros(R)
            for f, u, p in zip(fs, updates, weights):
                idx = u.meta.get("indices")
                if method == "hetlora":  # ‖s B A‖_F² = tr((BᵀB)(AAᵀ)): two r × r Gram products
                    float(((f.B.T @ f.B) * (f.A @ f.A.T)).sum())
                if idx is not None:  # fedplora: the client's modules K, averaged over the clients that trained each
                    B.index_add_(1, idx, f.B)
                    A.index_add_(0, idx, f.A)
                    count[idx] += 1
                else:
                    B[:, : f.B.shape[1]].add_(f.B, alpha=p * (u.scale if method == "hetlora" else 1.0))
                    if with_A:
                        A[: f.rank].add_(f.A, alpha=p)
            if method == "fedplora":
                c = count.clamp_min(1)
                B, A = B / c, A / c[:, None]
            out[n] = (B, A)
        return out

    def residual() -> object:
        """fedex: the means, then each client's centred pair (B_k − B̄, p_k s (A_k − Ā))."""
        means = accumulate(True)
        return {n: [(u.factors[n].B - B, (u.factors[n].A - A) * (p * u.scale)) for u, p in zip(updates, weights)] for n, (B, A) in means.items()}

    def copy() -> object:
        return [{n: (f.B.clone(), f.A.clone()) for n, f in u.factors.items()} for u in updates]

    kinds = {"stack": stack, "accumulate": lambda: accumulate(True), "accumulate_B": lambda: accumulate(False),
             "accumulate_A": lambda: accumulate(True, with_B=False), "residual": residual, "copy": copy}
    return kinds[kind]


def bench_method(name: str, layers: dict, updates: list[ClientUpdate], repeats: int) -> dict:
    kind_updates, kind_floor = KIND[name]
    ranks = {u.client: u.factors[next(iter(layers))].rank for u in updates}
    if name == "full":
        ranks = {k: HOMOGENEOUS for k in ranks}
    setup = Setup(layers, ranks, {k: (1.0 if name == "full" else SCALE) for k in ranks})
    weights = data_weights([u.num_examples for u in updates])
    if name == "fedplora":  # the uploads carry the modules each client drew
        probe = build_method(name, setup)
        updates = [dataclasses.replace(u, meta={"indices": probe.indices(u.client, 1)}) for u in updates]
    floor = floor_fn(kind_floor, updates, weights, name)
    agg_s, floor_s, plan_s = [], [], []
    warm = build_method(name, setup)  # first touch of fresh memory and kernel choice, untimed on both sides
    warm.aggregate(updates, weights, 1)
    del warm
    floor()
    for _ in range(repeats):  # interleaved, so a change in machine load hits both sides
        holder = [build_method(name, setup)]  # emptied before the floor is timed: its memory is freed first
        t, _ = benchlib.timed(lambda: (holder[0].aggregate(updates, weights, 1), holder[0].basis() if name == "flexlora" else None), 1)
        agg_s += t
        t, _ = benchlib.timed(lambda: [holder[0].plan(k, 2) for k in ranks], 1)
        plan_s += t
        holder.clear()
        t, _ = benchlib.timed(floor, 1)
        floor_s += t
    return {
        "updates": kind_updates, "floor": kind_floor, "layers": len(layers), "clients": len(updates),
        "ranks": [ranks[k] for k in sorted(ranks)],
        "upload_mb": sum((f.B.numel() if kind_floor != "accumulate_A" else 0) + (f.A.numel() if kind_floor != "accumulate_B" else 0)
                         for u in updates for f in u.factors.values()) * 4 / 1e6,
        "aggregate_s": agg_s, "floor_s": floor_s, "plans_s": plan_s,
        "aggregate_median_s": benchlib.median(agg_s), "floor_median_s": benchlib.median(floor_s), "plans_median_s": benchlib.median(plan_s),
        "ratio": benchlib.median(agg_s) / benchlib.median(floor_s),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=benchlib.QUICK, help="2 blocks (8 layers), full on 1 layer")
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks (4 layers each); default 32, quick 2")
    ap.add_argument("--full-layers", type=int, default=None, help="layers for `full` (64 MiB per client each); default 2, quick 1")
    ap.add_argument("--d", type=int, default=4096, help="d_out = d_in of every layer")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats after one untimed warm-up (default 3)")
    ap.add_argument("--methods", default=",".join(KIND))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    load = benchlib.uptime()
    torch.set_num_threads(args.threads)
    blocks = args.blocks or (2 if args.quick else 32)
    full_layers = args.full_layers or (1 if args.quick else 2)
    repeats = args.repeats or 3
    layers = layer_shapes(blocks, args.d)
    cache: dict[str, list[ClientUpdate]] = {}
    results: dict[str, dict] = {}
    for name in sorted(args.methods.split(","), key=lambda m: list(KIND).index(m)):
        kind = KIND[name][0]
        if kind not in cache:
            cache.clear()  # one set of synthetic uploads in memory at a time
            if kind == "full":
                cache[kind] = full_updates(dict(list(layers.items())[:full_layers]))
            else:
                cache[kind] = make_updates(layers, {"hetero": list(RANKS), "homo": [HOMOGENEOUS] * len(RANKS), "pooled": [max(RANKS)]}[kind])
        r = bench_method(name, dict(list(layers.items())[: len(next(iter(cache[kind])).factors)]), cache[kind], repeats)
        r["seconds_per_round_at_7b"] = r["aggregate_median_s"] * LLAMA_7B_LAYERS / r["layers"]  # linear in layers
        results[name] = r
        print(f"{name:12s} {r['layers']:4d} layers  aggregate {r['aggregate_median_s']:8.3f} s  floor {r['floor_median_s']:8.3f} s  "
              f"ratio {r['ratio']:5.2f}  plans {r['plans_median_s']:7.3f} s", flush=True)
    worst = max(results, key=lambda m: results[m]["ratio"])
    targets = [benchlib.target(f"{m} aggregate / floor", "<=", 1.5, r["ratio"]) for m, r in results.items()]
    doc = {"shape": {"blocks": blocks, "layers": len(layers), "d": args.d, "projections": list(PROJ), "ranks": list(RANKS),
                     "homogeneous_rank": HOMOGENEOUS, "full_layers": full_layers, "dtype": "float32"},
           "repeats": repeats, "worst": worst, "methods": results}
    benchlib.write("aggregation", args.quick, load, targets, doc, args.out)
    return doc


if __name__ == "__main__":
    main()
