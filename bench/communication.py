"""Benchmark 5: megabytes up and down per round for every method, and the ratio to full fine-tuning.

The bytes are the simulator's own counters (``plan_nbytes`` of the plan as sent, ``update_nbytes``
of the update as uploaded: the factors in ``ClientPlan.upload``) over each method's real plans and updates
for ``configs/default.yaml``'s layers (SmolLM2-135M-Instruct q_proj/v_proj from the model folder's
config, 10 clients, ranks 64…4, every client sampled), two rounds, with the ``client_prepare`` /
``client_finish`` hooks run as on a client. Training is replaced by a small random change of the
trained factors: a tensor's byte count does not depend on its values. One thing does: HETLoRA's
self-pruning shrinks an upload only when the tail norm fell, which a random change does not do,
so HETLoRA is counted unpruned (its upper bound). Round 2 is reported: FLoRA's and zero-padding's
downlink (the previous round's merge) and FlexLoRA's (the SVD of it) start there. Methods that
need one rank (fedit, ffa, fedsa, fedex, rolora) use the smallest client rank, as ``fedlora compare`` does.

    .venv/bin/python bench/communication.py [--quick]   # quick: configs/tiny.yaml (3 clients)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import benchlib
from fedlora.config import load_config
from fedlora.methods import REGISTRY, ClientUpdate, Factors
from fedlora.methods.base import as_received, client_finish, client_prepare, plan_nbytes, update_nbytes
from fedlora.ops.lowrank import kaiming_A, seeded_generator
from fedlora.app.compare import make_plan, method_config
from fedlora.federation.experiment import check_model

PAPER = {"flora": 0.215, "fedit": 0.177}  # FLoRA paper (Wang et al., 2024), communication relative to full fine-tuning


def trained(plan, shapes: dict[str, tuple[int, int]], gen: torch.Generator) -> dict[str, Factors]:
    """The factors a client would upload: its start (the plan's init, or a fresh LoRA) plus a small change."""
    out = {}
    for name, (d_out, d_in) in shapes.items():
        if plan.init is not None:
            B, A = plan.init[name].B, plan.init[name].A
        else:
            r = plan.rank_pattern.get(name, plan.rank)
            B, A = torch.zeros(d_out, r), kaiming_A(r, d_in, gen)
        B = B + 1e-3 * torch.randn(B.shape, generator=gen) if plan.train_B else B
        A = A + 1e-3 * torch.randn(A.shape, generator=gen) if plan.train_A else A
        out[name] = Factors(B=B, A=A)
    return out


def count(name: str, plan_cfg, shapes: dict[str, tuple[int, int]], rounds: int) -> dict:
    cfg, method, one_rank = method_config(plan_cfg, name, plan_cfg.seeds[0], shapes)
    clients = list(range(cfg.federation.num_clients))
    if method.pooled:
        clients = [0]
    kept: dict = {}  # what each client keeps on its side (FedSA-LoRA's B): never counted, it never travels
    gen = seeded_generator(cfg.seed, 0xB)
    per_round = []
    for rnd in range(1, rounds + 1):
        up = down = 0
        updates = []
        for k in clients:
            sent = method.plan(k, rnd)
            down += plan_nbytes(sent)
            plan = method.client_start(client_prepare(method, sent), kept.get(k))
            update = client_finish(method, plan, ClientUpdate(k, 10, plan.scale, trained(plan, shapes, gen)))
            up += update_nbytes(update, plan.upload)
            if (own := method.client_keep(plan, update)) is not None:
                kept[k] = own
            updates.append(as_received(update, plan, shapes))
        method.aggregate(updates, [1.0 / len(updates)] * len(updates), rnd)
        if not method.communicates:
            up = down = 0
        per_round.append({"round": rnd, "mb_up": up / 1e6, "mb_down": down / 1e6})
    return {"ranks": cfg.client_ranks(), "one_rank": cfg.client_ranks()[0] if one_rank else None, "rounds": per_round}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=benchlib.QUICK, help="configs/tiny.yaml")
    ap.add_argument("--config", default=None)
    ap.add_argument("--methods", default=",".join(REGISTRY))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    load = benchlib.uptime()
    config = args.config or ("configs/tiny.yaml" if args.quick else "configs/default.yaml")
    plan_cfg = make_plan(config, args.methods, 1, args.overrides)
    _, shapes = check_model(load_config(config, args.overrides))
    rows = {}
    for m in plan_cfg.methods:
        r = count(m, plan_cfg, shapes, args.rounds)
        last = r["rounds"][-1]
        r.update(mb_up=last["mb_up"], mb_down=last["mb_down"], mb_total=last["mb_up"] + last["mb_down"])
        rows[m] = r
    full = rows.get("full", {}).get("mb_total")
    for m, r in rows.items():
        r["ratio_to_full"] = r["mb_total"] / full if full else None
        r["paper_ratio"] = PAPER.get(m)
        ratio = "—" if r["ratio_to_full"] is None else f"{r['ratio_to_full']:.3f}"
        print(f"{m:12s} round {args.rounds}: up {r['mb_up']:9.2f} MB  down {r['mb_down']:9.2f} MB  ratio to full {ratio}"
              + (f"  (FLoRA paper: {PAPER[m]})" if m in PAPER else ""), flush=True)
    results = {"config": config, "overrides": args.overrides, "round_reported": args.rounds, "layers": len(shapes), "methods": rows}
    targets = []
    if "flora" in rows and "fedplora" in rows:  # Fed-PLoRA's claim: lighter than FLoRA
        targets.append(benchlib.target("fedplora MB / flora MB per round", "<=", 1.0, rows["fedplora"]["mb_total"] / rows["flora"]["mb_total"]))
    benchlib.write("communication", args.quick, load, targets, results, args.out)
    return results


if __name__ == "__main__":
    main()
