"""What the Flower runtimes hand the apps: the run config (server side) and the node config.

Both are flat maps of scalars (Flower allows bool/int/float/str only). The run config is
declared with its defaults in ``app/pyproject.toml``; ``flwr run … --run-config`` overrides it.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedlora.config import Config, ConfigError, load_config, packaged_config

ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
"""Set for every Flower process fedlora starts: no telemetry, no update check, no `uv sync`, offline."""

STATE_ENV = "FEDLORA_FLOWER_STATE"
THREADS_ENV = "FEDLORA_CLIENT_THREADS"
"""Torch threads of each ClientApp on Flower's simulation runtime (its CPU share), whatever OMP_NUM_THREADS says."""


@dataclass(frozen=True)
class RunSettings:
    """The ServerApp's run config."""

    config_path: str = ""  # absolute YAML path, or a packaged name (tiny, default); empty = default
    overrides: tuple[str, ...] = ()  # dotted key=value, as for `fedlora run`
    output_dir: str = ""  # absolute run folder; empty = output.dir of the config (then absolute)
    round_timeout: float = 3600.0  # seconds to wait for a round's replies
    node_timeout: float = 600.0  # seconds to wait for every partition's SuperNode to connect
    checkpoint_deltas: bool = False  # write checkpoints/round-<t>-delta.safetensors (G_t − W_0 as low-rank terms)
    resume: bool = False  # continue the run in output-dir from its newest complete checkpoint

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> "RunSettings":
        return cls(
            config_path=str(rc.get("config-path", "")),
            overrides=tuple(shlex.split(str(rc.get("overrides", "")))),
            output_dir=str(rc.get("output-dir", "")),
            round_timeout=float(rc.get("round-timeout", cls.round_timeout)),
            node_timeout=float(rc.get("node-timeout", cls.node_timeout)),
            checkpoint_deltas=bool(rc.get("checkpoint-deltas", False)),
            resume=bool(rc.get("resume", False)),
        )

    def load(self) -> Config:
        return load_config(resolve_config_path(self.config_path), list(self.overrides))

    def run_dir(self, cfg: Config) -> Path:
        """The absolute run folder: the ServerApp's working directory is the SuperLink's, not the user's."""
        path = self.output_dir or cfg.output.dir or ""
        if not path or not Path(path).expanduser().is_absolute():
            raise ConfigError(
                f"output-dir: {path!r} is not an absolute path; the ServerApp runs in the SuperLink's folder "
                "(accepted: --run-config 'output-dir=\"/abs/run\"' or output.dir=/abs/run)"
            )
        return Path(path).expanduser()


def resolve_config_path(value: str) -> Path:
    """An absolute path as is; a bare name (``tiny``) is a packaged config; empty is the default."""
    if not value:
        return packaged_config("default")
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    if "/" not in value and not path.suffix and packaged_config(value).is_file():
        return packaged_config(value)
    raise ConfigError(f"config-path: {value!r} is relative; the ServerApp runs in the SuperLink's folder (accepted: an absolute path, or tiny / default)")


@dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's ``--node-config``: which partition it holds, and optionally its rank and data."""

    partition: int
    num_partitions: int
    rank: int | None = None  # the rank this node can afford; default: the config's rank for the partition
    data_path: str | None = None  # the node's own data file; default: the config's source, split as the simulator does
    state_root: Path = Path()

    @classmethod
    def from_node_config(cls, nc: Mapping[str, Any]) -> "NodeSettings":
        missing = [k for k in ("partition-id", "num-partitions") if k not in nc]
        if missing:
            raise ConfigError(f"node config: {', '.join(missing)} not set (accepted: --node-config 'partition-id=0 num-partitions=3 [rank=4] [data-path=\"/x.jsonl\"]')")
        partition, num = int(nc["partition-id"]), int(nc["num-partitions"])
        if not 0 <= partition < num:
            raise ConfigError(f"node config: partition-id={partition} outside 0..{num - 1} (num-partitions={num})")
        rank = int(nc["rank"]) if "rank" in nc else None
        if rank is not None and rank < 1:
            raise ConfigError(f"node config: rank={rank} (accepted: a positive integer)")
        data = str(nc["data-path"]) if nc.get("data-path") else None
        state = nc.get("state-dir") or os.environ.get(STATE_ENV) or _default_state_root()
        return cls(partition, num, rank, data, Path(str(state)).expanduser())


def _default_state_root() -> Path:
    from fedlora.model.assets import cache_root

    return cache_root() / "flower-state"
