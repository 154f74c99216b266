"""The ServerApp: the config, the roll call, the simulator's setup, Strategy.start, the run folder.

Run config (``app/pyproject.toml``, overridable with ``flwr run … --run-config``):
``config-path`` (absolute YAML path or a packaged name), ``overrides`` (``key=value …`` as for
``fedlora run``), ``output-dir`` (absolute: the ServerApp runs in the SuperLink's folder),
``round-timeout``, ``node-timeout``, ``checkpoint-deltas``, ``resume`` (continue the run in
``output-dir`` from its newest complete checkpoint, as ``fedlora run --resume`` does).

The server evaluates the global model itself (the simulator's ``evaluate``), so it loads the
model and the config's data source; clients receive the resolved config in every message and
need no config file of their own.
"""

from __future__ import annotations

import os
import time
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedlora.flower.settings import ENV, RunSettings

if TYPE_CHECKING:
    from fedlora.methods.base import Delta

for _key, _value in ENV.items():  # before torch / transformers are imported
    os.environ.setdefault(_key, _value)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    import torch

    from fedlora.app import checkpoint
    from fedlora.app.run_dir import RunDir, lock, resume_config, summarize
    from fedlora.app.trackers import Trackers
    from fedlora.config import build_config, to_yaml
    from fedlora.federation.experiment import prepare
    from fedlora.federation.server import Server
    from fedlora.flower.roster import Roster
    from fedlora.flower.strategy import FedLoraStrategy

    t0 = time.perf_counter()
    settings = RunSettings.from_run_config(context.run_config)
    cfg = settings.load()
    out = settings.run_dir(cfg)
    if settings.resume:  # the run's own settings; the folder must hold its config
        cfg = resume_config(out, None, [*settings.overrides, f"output.dir={out}"])  # output.* may change, nothing else
    run = RunDir(out, resume=settings.resume)  # refuses a folder that already holds files, before any waiting
    held = lock(out)  # noqa: F841 - one ServerApp per run folder, until this process ends
    roster = Roster(cfg.federation.num_clients)
    log(INFO, "waiting for %d SuperNodes (one per partition)", cfg.federation.num_clients)
    roster.wait_for_all(grid, settings.node_timeout)
    ranks = roster.ranks(cfg.client_ranks())
    overrides = [f"output.dir={out}"] + ([f"lora.ranks={ranks}"] if ranks != cfg.client_ranks() else [])
    cfg = build_config(cfg.model_dump(mode="json"), overrides)  # node-declared ranks win; the real run folder
    torch.manual_seed(cfg.seed)
    exp = prepare(cfg)
    server = Server(exp)
    done = checkpoint.resume(run, server) if settings.resume else []
    if not settings.resume:
        run.write_config(cfg)
        run.write_partition(exp.partition_info)
    start = done[-1]["round"] if done else 0  # round 0's checkpoint: start 0 with one line, so round 0 is not recorded again
    def keep(entry: dict, lines: int) -> None:
        """After a round's line: its checkpoint, as the simulator writes it (and G_t − W_0 where the settings ask)."""
        checkpoint.save(run.checkpoints, server, entry["round"], lines, entry)
        if settings.checkpoint_deltas and entry["round"] > 0:
            save_delta(server.method.global_delta(), run.checkpoints / f"round-{entry['round']}-delta.safetensors")

    strategy = FedLoraStrategy(
        server, roster, to_yaml(cfg), run.record, roll_call_timeout=min(60.0, settings.round_timeout),
        keep=keep, start_round=start, lines=len(done), run_key=run_key(out),
    )
    trackers = Trackers(cfg.output.trackers, out, cfg)
    run.listeners.append(trackers)
    try:
        strategy.start(grid, ArrayRecord(), num_rounds=cfg.federation.rounds - start, timeout=settings.round_timeout, evaluate_fn=strategy.evaluate)
    finally:
        trackers.close()
    if cfg.output.save_final:
        from fedlora.app.final import save_final

        save_final(server, out / "final")
    metrics = run.read_metrics()
    summary = summarize(metrics, time.perf_counter() - t0)
    rounds = [m for m in metrics if m["round"] > 0]
    summary.update({
        "run_dir": str(out), "transport": "flower", "wire_dtype": cfg.federation.wire_dtype,
        "wire_bytes_up": sum(m["wire_bytes_up"] for m in rounds), "wire_bytes_down": sum(m["wire_bytes_down"] for m in rounds),
        "lost": [{"round": m["round"], **x} for m in rounds for x in m["lost"]],
    })
    run.write_summary(summary)
    log(INFO, "fedlora run folder: %s (global loss %s → %s)", out, summary["global_loss"]["before"], summary["global_loss"]["after"])


def save_delta(delta: Delta, path: Path) -> None:
    """G_t − W_0 as its terms (``ops.delta_tensors``: ``<layer>/<j>/B|A``, or ``/W``) in one safetensors file."""
    from safetensors.torch import save_file

    from fedlora.filemode import as_umask
    from fedlora.ops.delta_tensors import delta_to_tensors

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().contiguous().clone() for k, t in delta_to_tensors(delta).items()}, str(path))
    as_umask(path)


def run_key(folder: Path) -> str:
    """Names each node's saved base: one per run folder, the same for a ServerApp restarted on it (not Flower's run id)."""
    import hashlib

    return f"{folder.name}-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]}"
