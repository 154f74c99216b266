"""FlexLoRA's SVD of ΔW_g = Σ p_k s_k B_k A_k: low-rank path vs the dense d × d SVD.

Llama-7B shapes (one 4096 × 4096 projection), K = 10 clients with ranks 64,32,16,16,8,8,4,4,4,4
(Σr = 160), float32, 2 threads. The low-rank path is ``fedlora.ops.lowrank.lowrank_svd`` (QR of
the stacked factors, SVD of the 160 × 160 core, two products); the dense path forms B_stack A_stack
and calls ``torch.linalg.svd(full_matrices=False)``. Both run in the same process, medians over
repeats; the dense SVD repeats until ``--dense-repeats`` or the ``--budget-s`` time budget is
spent (at least once), so the run stays near two minutes on two busy cores.

Writes bench/results/flexlora_svd[_quick].json in the common shape (bench/benchlib.py).

    .venv/bin/python bench/flexlora_svd.py [--quick] [--d 4096] [--repeats 5] [--dense-repeats 3] [--budget-s 75]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import benchlib
from benchlib import timed
from fedlora.ops.lowrank import LowRank, kaiming_A, lowrank_svd, seeded_generator, stack

RANKS = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)
EXAMPLES = (120, 80, 60, 60, 40, 40, 20, 20, 20, 20)  # n_k, for p_k = n_k / Σ n_j
SCALE = 2.0  # s_k = lora_alpha_k / r_k with lora_alpha_k = 2 r_k (FLoRA's setting)


def client_terms(d: int, seed: int) -> list[LowRank]:
    """(B_k, p_k s_k A_k) for the ten clients: B_k ~ N(0, 0.01²) as after training, A_k Kaiming-uniform."""
    total = sum(EXAMPLES)
    terms = []
    for k, (r, n) in enumerate(zip(RANKS, EXAMPLES)):
        gen = seeded_generator(seed, k)
        B = torch.randn(d, r, generator=gen) * 0.01  # (d × r_k)
        A = kaiming_A(r, d, gen, torch.float32)  # (r_k × d)
        terms.append(LowRank(B, A * (SCALE * n / total)))
    return terms


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=benchlib.QUICK, help="d = 2048, one dense SVD")
    ap.add_argument("--d", type=int, default=None, help="d_out = d_in of the layer (default 4096, quick 2048)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the low-rank SVD and of forming the dense matrix")
    ap.add_argument("--dense-repeats", type=int, default=3, help="at most this many dense SVDs")
    ap.add_argument("--budget-s", type=float, default=75.0, help="stop repeating the dense SVD after this many seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    load = benchlib.uptime()
    torch.set_num_threads(args.threads)
    args.d = args.d or (2048 if args.quick else 4096)
    if args.quick:
        args.dense_repeats = 1

    terms = client_terms(args.d, args.seed)
    s = stack(terms)  # (d × Σr), (Σr × d)
    lowrank_svd(terms)  # warm-up: first-call allocations and kernel selection
    lr_times, (u_lr, sv_lr, vh_lr) = timed(lambda: lowrank_svd(terms), args.repeats)
    form_times, dense = timed(lambda: s.B @ s.A, args.repeats)  # (d × d)
    svd_times, (u_d, sv_d, vh_d) = timed(lambda: torch.linalg.svd(dense, full_matrices=False), args.dense_repeats, args.budget_s)

    k = sv_lr.numel()  # Σr = 160 nonzero singular values; the dense tail is round-off
    sv_rel = float(((sv_lr - sv_d[:k]).abs() / sv_d[:k]).max())
    r = RANKS[0]  # the widest client's truncation, as FlexLoRA sends it
    trunc_lr = (u_lr[:, :r] * sv_lr[:r]) @ vh_lr[:r]
    trunc_d = (u_d[:, :r] * sv_d[:r]) @ vh_d[:r]
    trunc_rel = float(torch.linalg.matrix_norm(trunc_lr - trunc_d) / torch.linalg.matrix_norm(trunc_d))
    full_rel = float(torch.linalg.matrix_norm((u_lr * sv_lr) @ vh_lr - dense) / torch.linalg.matrix_norm(dense))

    lowrank_s = statistics.median(lr_times)
    dense_s = statistics.median(form_times) + statistics.median(svd_times)
    result = {
        "shape": {"d_out": args.d, "d_in": args.d, "ranks": list(RANKS), "sum_r": sum(RANKS), "dtype": "float32"},
        "seconds": {
            "lowrank_svd": lr_times,
            "dense_form": form_times,
            "dense_svd": svd_times,
            "lowrank_median": lowrank_s,
            "dense_median": dense_s,
        },
        "speedup_dense_over_lowrank": dense_s / lowrank_s,
        "max_rel_diff_singular_values": sv_rel,
        "rel_diff_rank64_truncation": trunc_rel,
        "rel_err_lowrank_reconstruction": full_rel,
    }
    print(f"d={args.d} ranks={list(RANKS)} float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"low-rank SVD : {lowrank_s * 1e3:9.1f} ms  (median of {len(lr_times)})")
    print(f"dense SVD    : {dense_s * 1e3:9.1f} ms  (form {statistics.median(form_times) * 1e3:.1f} ms + svd, median of {len(svd_times)})")
    print(f"ratio dense / low-rank: {dense_s / lowrank_s:.0f}x")
    print(f"max relative difference of the {k} singular values: {sv_rel:.2e}; rank-{r} truncation: {trunc_rel:.2e}")
    benchlib.write("flexlora_svd", args.quick, load, [benchlib.target("dense SVD / low-rank SVD", ">=", 100.0, dense_s / lowrank_s)], result, args.out)
    return result


if __name__ == "__main__":
    main()
