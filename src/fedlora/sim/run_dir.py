"""The run folder: config.yaml, partition.json, metrics.jsonl, summary.json, final/.

Numbers go to files (metrics.jsonl: one JSON object per round, flushed as it happens);
people get logging and the closing table.
"""

from __future__ import annotations

import json
import math
import os
import resource
from datetime import datetime
from pathlib import Path
from typing import Any

from fedlora.config import Config, to_yaml


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{method}"


def _clean(x: Any) -> Any:
    """NaN/inf → None so metrics.jsonl stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, obj: Any) -> None:
    """Write atomically: a crash never leaves a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2) + "\n")
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"output.dir: {path} already holds files (accepted: a new or empty folder)")
        path.mkdir(parents=True, exist_ok=True)
        self.metrics = path / "metrics.jsonl"

    def write_config(self, cfg: Config) -> None:
        (self.path / "config.yaml").write_text(to_yaml(cfg))

    def write_partition(self, info: dict[str, Any]) -> None:
        write_json(self.path / "partition.json", info)

    def record(self, entry: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(_clean(entry)) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
        "wall_s": wall_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def _mean(xs: list[Any]) -> float | None:
    vals = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None
