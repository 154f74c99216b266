"""The run folder: config.yaml, partition.json, metrics.jsonl, summary.json, final/.

Numbers go to files (metrics.jsonl: one JSON object per round, flushed as it happens);
people get logging and the closing table.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from fedlora.config import Config, ConfigError, to_yaml


def default_run_dir(method: str) -> Path:
    """runs/<timestamp>-<method>; a method's dotted path (``pkg.module:Class``) without its colon."""
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{method.replace(':', '.')}"


def clean_json(x: Any) -> Any:
    """NaN/inf → None so metrics.jsonl stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean_json(v) for v in x]
    return x


def write_json(path: Path, obj: Any) -> None:
    """Write atomically: a crash never leaves a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean_json(obj), indent=2) + "\n")
    os.replace(tmp, path)


def lock(path: Path) -> Any:
    """Hold ``path/.lock`` for this process (released when it exits, also when it is killed); one line if another holds it."""
    import fcntl

    try:
        handle = open(path / ".lock", "a")  # noqa: SIM115 - held for the life of the process
    except OSError as e:  # a read-only file system, no permission
        raise ConfigError(f"output.dir: cannot write {path / '.lock'} ({e.strerror or type(e).__name__}) (accepted: a folder you can write to)") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"output.dir: {path} is in use by another fedlora process (accepted: one process per run folder at a time)") from None
    return handle


def finished(path: Path, rounds: int) -> bool:
    """Whether the run in ``path`` has its summary and every round's line: a resume has nothing to do."""
    try:
        last = json.loads((path / "metrics.jsonl").read_text().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return False
    return (path / "summary.json").is_file() and last.get("round") == rounds


def holds_run(path: Path) -> bool:
    """Whether ``path`` is the folder of a run (what only that run's own commands may write into)."""
    return (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()


class RunDir:
    def __init__(self, path: Path, resume: bool = False) -> None:
        """A new (or empty) folder; with ``resume``, the folder of an earlier run of the same config."""
        self.path = path
        if resume and not (path / "config.yaml").is_file():
            raise ConfigError(f"--resume: {path} holds no config.yaml (accepted: the folder of an earlier fedlora run)")
        if not resume and path.is_dir() and any(path.iterdir()):
            raise FileExistsError(f"output.dir: {path} already holds files (accepted: a new or empty folder, or --resume {path})")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # under a file, on a read-only or virtual file system (/proc)
            raise ConfigError(f"output.dir: cannot create {path} ({e.strerror or type(e).__name__}) (accepted: a folder path you can write to)") from None
        self.metrics = path / "metrics.jsonl"
        self.checkpoints = path / "checkpoints"
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # e.g. experiment trackers: each entry once it is on disk

    def rewrite_metrics(self, metrics: list[dict[str, Any]]) -> None:
        """metrics.jsonl := the given entries (a resumed run drops lines of rounds after its checkpoint)."""
        tmp = self.metrics.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps(clean_json(e)) + "\n" for e in metrics)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics)

    def write_config(self, cfg: Config) -> None:
        (self.path / "config.yaml").write_text(to_yaml(cfg))

    def write_partition(self, info: dict[str, Any]) -> None:
        write_json(self.path / "partition.json", info)

    def record(self, entry: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(clean_json(entry)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for listener in self.listeners:
            listener(entry)

    def read_metrics(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(metrics: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    evals = [m for m in metrics if "eval" in m]
    first, last = evals[0]["eval"], evals[-1]["eval"]
    rounds = [m for m in metrics if m["round"] > 0]
    pads = [c["padded_fraction"] for m in rounds for c in m["clients"]]
    return {
        "method": metrics[0]["method"],
        "rounds": len(rounds),
        "global_loss": {"before": first["global"]["loss"], "after": last["global"]["loss"]},
        **({"global_accuracy": {"before": first["global"]["accuracy"], "after": last["global"]["accuracy"]}} if "accuracy" in first["global"] else {}),
        "client_loss": {k: {"before": first["clients"][k]["loss"], "after": last["clients"][k]["loss"]} for k in first["clients"]},
        "bytes_up": sum(m["bytes_up"] for m in rounds),
        "bytes_down": sum(m["bytes_down"] for m in rounds),
        "agg_noise_mean": _mean([m["agg_noise"] for m in rounds]),
        "init_noise_mean": _mean([m["init_noise"] for m in rounds]),
        "padded_fraction": _mean(pads),
        **_privacy(rounds),
        "wall_s": wall_s,
        "peak_rss_mb": peak_rss_mb(),
        **provenance(),
    }


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """The fedlora version that ran, and the git commit of its source tree when it runs from a checkout."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("fedlora")
    except PackageNotFoundError:
        ver = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"fedlora_version": ver, "commit": commit}


def _privacy(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Client-level DP: the ε spent by the last round (the accountant's, cumulative), δ, σ and C; nothing without DP."""
    spent = [m["privacy"] for m in rounds if "privacy" in m]
    return {"privacy": {**spent[-1], "rounds": len(spent)}} if spent else {}


def _mean(xs: list[Any]) -> float | None:
    vals = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


def resume_config(folder: Path, config: str | Path | None, overrides: list[str]) -> Config:
    """The config of the run in ``folder``, with the given config/overrides, which may change output.* only."""
    from fedlora.config import load_config

    saved_path = folder / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume: {folder} holds no config.yaml (accepted: the folder of an earlier fedlora run)")
    saved = load_config(saved_path, [])
    given = load_config(config or saved_path, overrides)
    old, new = _flat(saved.model_dump(mode="json")), _flat(given.model_dump(mode="json"))
    for key in sorted(set(old) | set(new)):
        if not key.startswith("output.") and old.get(key) != new.get(key):
            raise ConfigError(
                f"--resume: {key}={new.get(key)!r} differs from {old.get(key)!r} in {saved_path} "
                "(accepted: the run's own settings; only output.* may change on resume)"
            )
    return given


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "options" and not k.endswith("patterns"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
