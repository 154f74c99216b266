"""Reading a finished run folder: its resolved config, its metrics, its final adapter(s).

A run folder (written by `fedlora run`) holds config.yaml, metrics.jsonl, summary.json and
final/ (the global update as a PEFT adapter, or final/client-K/ for a personal method).
Whatever is missing or malformed fails here with one line naming the folder and the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import Config, ConfigError, load_config
from fedlora.integrity import damage, sealed


class RunFolderError(ValueError):
    """A run or model folder that cannot be used as asked (printed as one line by the CLI)."""


@dataclass(frozen=True)
class Run:
    path: Path
    cfg: Config
    metrics: list[dict[str, Any]]

    @property
    def label(self) -> str:
        return self.path.name

    @property
    def personal(self) -> bool:
        """A method with no global model (``local``): one adapter per client under final/."""
        return (self.path / "final" / "client-0").is_dir()

    def adapter_dir(self, client: int | None = None) -> Path:
        """final/ (or final/client-K/ for a personal method), checked to hold a PEFT adapter."""
        final = self.path / "final"
        if self.personal and client is None:
            ids = sorted(int(p.name.split("-")[1]) for p in final.glob("client-*"))
            raise RunFolderError(f"--client: {self.cfg.federation.method} runs have no global model, only per-client ones (accepted: --client one of {ids})")
        if client is not None and not self.personal:
            raise RunFolderError(f"--client: {self.path} holds a global model, not per-client ones (accepted: no --client)")
        folder = final / f"client-{client}" if client is not None else final
        if not (folder / "adapter_config.json").is_file():
            raise RunFolderError(f"RUN_DIR: no adapter at {folder} (accepted: a run folder written with output.save_final=true)")
        if problem := damage(folder) if sealed(folder) else unreadable(folder / "adapter_model.safetensors"):
            raise RunFolderError(f"RUN_DIR: {problem}: the adapter was changed or damaged after the run wrote it "
                                 f"(accepted: an intact {folder.name}/; resume or rerun the run to write it again)")
        return folder


def unreadable(path: Path) -> str | None:
    """Why a safetensors file without a checksum cannot be read whole (an older run's final/), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        return f"{path} cannot be read ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    return None


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def open_run(path: str | Path) -> Run:
    """The run's resolved config and every metrics.jsonl entry."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"RUN_DIR: {path} is not a folder (accepted: a folder written by `fedlora run`)")
    if not is_run_dir(path):
        raise RunFolderError(f"RUN_DIR: {path} holds no config.yaml and metrics.jsonl (accepted: a folder written by `fedlora run`)")
    try:
        cfg = load_config(path / "config.yaml", [])
    except ConfigError as e:
        raise RunFolderError(f"RUN_DIR: {path / 'config.yaml'} is not a valid fedlora config ({e})") from None
    metrics = []
    for n, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), 1):
        if line.strip():
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunFolderError(f"RUN_DIR: {path / 'metrics.jsonl'} line {n} is not JSON (accepted: one JSON object per line)") from None
    if not metrics:
        raise RunFolderError(f"RUN_DIR: {path / 'metrics.jsonl'} is empty (accepted: a run that finished at least its round-0 evaluation)")
    return Run(path, cfg, metrics)
