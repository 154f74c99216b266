"""Each round's metrics line, also in the experiment trackers researchers already use — all offline.

``output.trackers: [tensorboard, mlflow, wandb]`` (any subset): TensorBoard event files in
``RUN_DIR/tensorboard``, an MLflow store in ``RUN_DIR/mlflow.db`` (SQLite: MLflow's file store is
deprecated), a W&B offline run in
``RUN_DIR/wandb`` (``wandb sync`` uploads it later, if ever). One tracker run per fedlora run,
named after the run folder, with the resolved config as its parameters; per round the same
numbers metrics.jsonl holds: global and per-client loss/accuracy, bytes up/down, agg/init
noise, wall seconds. metrics.jsonl stays the record; a tracker is a view of it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

from fedlora.config import Config, ConfigError

log = logging.getLogger(__name__)

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_installed(names: list[str]) -> None:
    """One line for a tracker whose package is missing, before any work."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"output.trackers: {name!r} needs the {PACKAGES[name]} package, which is not installed "
                              f"(accepted: pip install -e \".[trackers]\" in the fedlora checkout, or leave {name!r} out)")


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl entry as flat ``group/name`` scalars (finite numbers only)."""
    out: dict[str, float] = {}
    ev = entry.get("eval") or {}
    for k, v in (ev.get("global") or {}).items():
        out[f"global/{k}"] = v
    for client, metrics in (ev.get("clients") or {}).items():
        for k, v in (metrics or {}).items():
            out[f"client_{client}/{k}"] = v
    for k in ("bytes_up", "bytes_down", "agg_noise", "init_noise", "wall_s", "rss_mb"):
        if k in entry:
            out[f"round/{k}"] = entry[k]
    for c in entry.get("clients") or []:
        if "train_loss" in c:
            out[f"client_{c['id']}/train_loss"] = c["train_loss"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as ``section.key`` parameters (lists and dicts as text)."""
    out = {}
    for section, values in cfg.model_dump(mode="json").items():
        for k, v in (values.items() if isinstance(values, dict) else [("", values)]):
            out[f"{section}.{k}" if k else section] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class TensorBoard:
    def __init__(self, run: Path, cfg: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from fedlora.config import to_yaml

        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))
        self.writer.add_text("config", "```\n" + to_yaml(cfg) + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, run: Path, cfg: Config) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=f"sqlite:///{(run / 'mlflow.db').resolve()}")
        experiment = self.client.get_experiment_by_name("fedlora")
        eid = experiment.experiment_id if experiment else self.client.create_experiment("fedlora")
        self.run_id = self.client.create_run(eid, run_name=run.name).info.run_id
        for k, v in flat_config(cfg).items():
            self.client.log_param(self.run_id, k, "null" if v is None else str(v)[:6000])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "."), v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, run: Path, cfg: Config) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(mode="offline", dir=str(run), project="fedlora", name=run.name, config=flat_config(cfg), reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


KINDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
PATHS = {"tensorboard": ("tensorboard", True), "mlflow": ("mlflow.db", False), "wandb": ("wandb", True)}  # what each writes in the run folder


class Trackers:
    """The configured trackers, fed each metrics entry as it is recorded; closed at the end of the run.

    They start at the first entry recorded, not before: a resume refused for a damaged checkpoint
    writes no tracker file, and a resumed run's tracker run gets the rounds kept from before, then
    the new ones (metrics.jsonl up to and including that entry is replayed).
    """

    def __init__(self, names: list[str], run: Path, cfg: Config) -> None:
        check_installed(names)
        for name in names:  # a path in the way is found now, not after a round was trained
            where, folder = PATHS[name]
            path = run / where
            if path.exists() and path.is_dir() != folder:
                raise ConfigError(f"output.trackers: {name!r} writes to {path}, which is a {'file' if folder else 'folder'} "
                                  f"(accepted: a run folder where {where} is free or a {'folder' if folder else 'file'})")
        self.names, self.run, self.cfg = list(names), run, cfg
        self.open: list[Tracker] | None = None

    def _start(self) -> list[Tracker]:
        started: list[Tracker] = []
        for name in self.names:
            try:
                started.append(KINDS[name](self.run, self.cfg))
            except Exception as e:  # a tracker that cannot start must not cost the run a traceback
                for t in started:
                    t.close()
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise ConfigError(f"output.trackers: {name!r} could not start: {first} (accepted: a working install, or leave {name!r} out)") from None
        log.info("trackers: %s (offline, in %s)", ", ".join(self.names), self.run)
        return started

    def __call__(self, entry: dict[str, Any]) -> None:
        if not self.names:
            return
        if self.open is None:
            self.open = self._start()
            lines = (self.run / "metrics.jsonl").read_text().splitlines()
            backlog = [json.loads(x) for x in lines if x.strip()][:-1]  # the last line is ``entry`` itself
        else:
            backlog = []
        for e in [*backlog, entry]:
            values = scalars(e)
            for t in self.open:
                t.log(int(e["round"]), values)

    def close(self) -> None:
        for t in self.open or []:
            t.close()
        self.open = None
