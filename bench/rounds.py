"""Benchmark 6: every method over 200 rounds — does a round cost at round 200 what it cost at round 2?

Shapes: Llama-2-7B's q, k, v, o at 4096 × 4096 (``--blocks`` transformer blocks; the quick mode
one projection), 100 clients at 10 % participation (10 a round, seeded), ranks 64,32,16,16,8,8,4,4,4,4
repeated, ``lora_alpha = 2r``; the methods that need one rank give everyone rank 16. Synthetic updates: each
client's factors are its plan's initial factors (or a fresh draw) plus a random step, taken from
a fixed pool so that drawing them costs nothing measurable.

Everything else is the real code: the method's plans (the catch-up a client at an old version
gets), ``client_prepare``/``client_finish``, the model side of the simulator (``AdapterHost`` over
4096 × 4096 linear layers: the base brought up to date once per round, each client's fold and
restore), the server half (``ServerRound``: validate, fold in, commit, agg/init noise, round
metrics) and the checkpoint (``methods.state.state_dict`` written with safetensors).

Per round: server seconds (plans + receive + finish), client-preparation seconds (base update and
every client's fold/restore), the method's state bytes, the checkpoint's bytes on disk, the mean
downlink bytes per client, the process RSS. Targets (one run, ratios): round 200 / round 2 ≤ 1.1
for server time, state and checkpoint bytes, for every method; reported too from round 50
(where a merging method's base has filled its layers, §4 of methods.md).

    .venv/bin/python bench/rounds.py [--quick] [--blocks 1] [--rounds 200] [--clients 100] [--methods flora,...]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

import benchlib
from fedlora.methods import REGISTRY, ClientUpdate, Factors, Setup, build_method
from fedlora.methods.base import client_finish, client_prepare, plan_nbytes
from fedlora.methods.state import state_dict
from fedlora.model.adapters import AdapterHost
from fedlora.federation.server import sample_clients
from fedlora.federation.round import Arrival, ServerRound, bounds_of, start_of

PATTERN = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)
HOMOGENEOUS = 16
SCALE = 2.0
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MARKS = (2, 50, 100, 200)


class Pool:
    """Random matrices drawn once; a client's step is a slice of them times a fresh scalar (no per-round draws)."""

    def __init__(self, d: int, width: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.B = torch.randn(d, width, generator=gen) * 1e-3
        self.A = torch.randn(width, d, generator=gen) / d**0.5
        self.W = None
        self.gen = gen

    def dense(self, d: int) -> torch.Tensor:
        if self.W is None:
            self.W = torch.randn(d, d, generator=self.gen) * 1e-4
        return self.W

    def scalar(self) -> float:
        return float(torch.rand((), generator=self.gen)) + 0.5


def synthetic_update(plan, layers: dict[str, tuple[int, int]], pool: Pool, n: int) -> ClientUpdate:
    """What a client would return: initial factors (or a fresh draw) plus a random step, A kept where it is frozen."""
    factors = {}
    for name, (d_out, d_in) in layers.items():
        r = plan.rank_pattern.get(name, plan.rank)
        c = pool.scalar()
        if r >= d_in and not plan.train_A:  # full: B is the weight delta, A the identity
            step_B, step_A = pool.dense(d_in)[:d_out] * c, None
        else:
            off = int(c * 7) % (pool.B.shape[1] - r + 1)
            step_B, step_A = pool.B[:d_out, off : off + r] * c, pool.A[off : off + r, :d_in]
        init = (plan.init or {}).get(name)
        B = step_B if init is None else (init.B + step_B if plan.train_B else init.B)
        if not plan.train_A:
            A = init.A
        else:
            A = step_A if init is None else init.A + 0.01 * step_A
        factors[name] = Factors(B=B.contiguous(), A=A.contiguous())
    return ClientUpdate(client=plan.client, num_examples=n, scale=plan.scale, factors=factors, train_loss=1.0)


def run_method(name: str, layers: dict, rounds: int, clients: int, fraction: float, pool: Pool, folder: Path) -> dict:
    width = min(min(s) for s in layers.values())  # tiny test shapes: no rank above the layer's
    if name == "centralized":
        method = build_method(name, Setup(layers, {0: min(width, max(PATTERN))}, {0: SCALE}, seed=0))
    else:
        method = benchlib.build_hetero_or_homo(name, layers, clients, [min(width, r) for r in PATTERN], min(width, HOMOGENEOUS), SCALE)
    ranks = method.setup.ranks
    model = torch.nn.ModuleDict({n.replace(".", "_"): torch.nn.Linear(d_in, d_out, bias=False) for n, (d_out, d_in) in layers.items()})
    model.requires_grad_(False)
    host = AdapterHost(model, [n.replace(".", "_") for n in layers])
    rename = {n: n.replace(".", "_") for n in layers}
    bounds = bounds_of(method, 1e9)
    proc = psutil.Process()
    rows = []
    for t in range(1, rounds + 1):
        sampled = [0] if method.pooled else sample_clients(len(ranks), fraction, 1, 0, t)
        t0 = time.perf_counter()
        before = method.global_delta()
        plans = {k: method.plan(k, t) for k in sampled}
        server = ServerRound(method, bounds, t, name, sampled, 1, before)
        t_server = time.perf_counter() - t0
        t_client = 0.0
        down = []
        for k in sampled:
            sent = plans.pop(k)
            down.append(plan_nbytes(sent))
            plan = method.client_start(client_prepare(method, sent), None)  # a client's kept state: not modelled (it never reaches the server)
            c0 = time.perf_counter()
            host.catch_up(plan.base)  # in one process: already at the version (a no-op), as in the simulator
            host.set_delta({rename[n]: ts for n, ts in plan.fold.items()})
            host.restore()
            t_client += time.perf_counter() - c0
            update = client_finish(method, plan, synthetic_update(plan, layers, pool, 10 + k % 7))
            s0 = time.perf_counter()
            server.receive(Arrival(sent, plan, update, start_of(method, plan)))
            t_server += time.perf_counter() - s0
            del sent, plan, update
        s0 = time.perf_counter()
        entry = server.finish(lambda *a: None)
        t_server += time.perf_counter() - s0
        c0 = time.perf_counter()
        if method.merged is not None:  # the simulator's one base: this round's merge, added once
            up = method.merged.update_since(host.version)
            if up is not None:
                up.merges = {rename[n]: ts for n, ts in up.merges.items()}
                up.reset = {rename[n]: ts for n, ts in up.reset.items()}
            host.catch_up(up)
        t_client += time.perf_counter() - c0
        del before
        tensors, _ = state_dict(method)
        state_bytes = sum(x.numel() * x.element_size() for x in tensors.values())
        path = folder / f"{name}.safetensors"
        k0 = time.perf_counter()
        save_file(tensors, str(path))
        t_ckpt = time.perf_counter() - k0
        ckpt = path.stat().st_size
        del tensors
        rows.append({
            "round": t, "server_s": t_server, "client_prep_s": t_client, "checkpoint_s": t_ckpt, "state_bytes": state_bytes,
            "checkpoint_bytes": ckpt, "down_bytes_per_client": sum(down) / len(down), "rss_mb": proc.memory_info().rss / 2**20,
            "agg_noise": entry["agg_noise"],
        })
        if t in MARKS or t % 25 == 0:
            r = rows[-1]
            print(f"  {name} round {t}: server {r['server_s']:.3f}s, client prep {r['client_prep_s']:.3f}s, state {r['state_bytes'] / 1e6:.1f} MB, "
                  f"checkpoint {r['checkpoint_bytes'] / 1e6:.1f} MB, down {r['down_bytes_per_client'] / 1e6:.2f} MB/client, rss {r['rss_mb']:.0f} MB", flush=True)
    del method, host, model
    gc.collect()
    return {"ranks": sorted(set(ranks.values()), reverse=True), "rows": rows}


def smoothed(rows: list[dict], key: str, at: int, window: int = 3) -> float:
    """Median of ``key`` over rounds at−window+1..at+window−1 present (time on a shared machine is noisy)."""
    vals = sorted(r[key] for r in rows if abs(r["round"] - at) < window)
    return vals[len(vals) // 2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=benchlib.QUICK)
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks of q,k,v,o (default 1; quick: one projection)")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--methods", default=",".join(sorted(REGISTRY)))
    ap.add_argument("--full-d", type=int, default=1024, help="layer width for `full` (its diagnostics densify d³ per client)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = benchlib.uptime()
    if args.quick and args.blocks is None:
        layers = {"model.layers.0.self_attn.q_proj": (args.d, args.d)}
    else:
        layers = {f"model.layers.{i}.self_attn.{p}": (args.d, args.d) for i in range(args.blocks or 1) for p in PROJ}
    marks = [m for m in MARKS if m <= args.rounds]
    first, last = marks[0], marks[-1]
    pool = Pool(args.d, max(PATTERN) * 2)
    results, targets = {"layers": len(layers), "d": args.d, "rounds": args.rounds, "clients": args.clients, "fraction": args.fraction, "methods": {}}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            mine = {n: (min(args.d, args.full_d),) * 2 for n in layers} if name == "full" else layers
            d = mine[next(iter(mine))][0]
            print(f"[rounds] {name}: {args.rounds} rounds, {len(mine)} layers of {d}×{d}", flush=True)
            out = run_method(name, mine, args.rounds, args.clients, args.fraction, pool if d == args.d else Pool(d, max(PATTERN) * 2), Path(tmp))
            out["d"] = d
            rows = out["rows"]
            at = {m: {k: smoothed(rows, k, m) if k.endswith("_s") else rows[m - 1][k] for k in rows[0] if k != "round"} for m in marks}
            ratio = {key: {f"{last}/{first}": at[last][key] / max(at[first][key], 1e-12),
                           **({f"{last}/50": at[last][key] / max(at[50][key], 1e-12)} if 50 in at and last != 50 else {})}
                     for key in ("server_s", "client_prep_s", "state_bytes", "checkpoint_bytes", "rss_mb", "down_bytes_per_client")}
            results["methods"][name] = {"ranks": out["ranks"], "d": out["d"], "at": at, "ratios": ratio, "per_round": rows}
            for key in ("server_s", "state_bytes", "checkpoint_bytes"):
                targets.append(benchlib.target(f"{name} {key} round {last}/{first}", "<=", 1.1, ratio[key][f"{last}/{first}"]))
                if f"{last}/50" in ratio[key]:
                    targets.append(benchlib.target(f"{name} {key} round {last}/50", "<=", 1.1, ratio[key][f"{last}/50"]))
            benchlib.write("rounds", args.quick, load, targets, results, args.out)  # each method's figures as soon as it ends
    path = benchlib.write("rounds", args.quick, load, targets, results, args.out)
    plot(results, path.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    """Server seconds, state MB and mean downlink MB per client against the round, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("server_s", "server seconds per round", 1.0), ("state_bytes", "method state (MB)", 1e6), ("down_bytes_per_client", "downlink per client (MB)", 1e6))
    fig, axes = plt.subplots(1, len(keys), figsize=(15, 4.2))
    for ax, (key, label, div) in zip(axes, keys):
        for name, r in sorted(results["methods"].items()):
            rows = r["per_round"]
            ax.plot([x["round"] for x in rows], [x[key] / div for x in rows], label=name, linewidth=1.2)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"{results['layers']} layers of {results['d']}×{results['d']}, {results['clients']} clients at {results['fraction']:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"[rounds] wrote {path}")


if __name__ == "__main__":
    main()
