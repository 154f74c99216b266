"""The comparison's PNG: a global metric against round and against megabytes sent, mean ± std over seeds.

Input is, per method, the seeds' runs as lists of per-round metrics dicts (metrics.jsonl lines);
the band is one sample standard deviation across seeds at each evaluated round.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Run = Sequence[Mapping[str, Any]]


def mean_curve(runs: Sequence[Run], metric: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Rounds evaluated in every run, the metric's mean and std there, and the mean cumulative MB (up + down)."""
    per_run = []
    for run in runs:
        total, points = 0.0, {}
        for e in run:
            total += (e.get("bytes_up") or 0) + (e.get("bytes_down") or 0)
            v = ((e.get("eval") or {}).get("global") or {}).get(metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                points[int(e["round"])] = (float(v), total / 1e6)
        per_run.append(points)
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    ys = [[p[r][0] for p in per_run] for r in rounds]
    mb = [statistics.fmean(p[r][1] for p in per_run) for r in rounds]
    return rounds, [statistics.fmean(y) for y in ys], [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys], mb


def plot_compare(runs_by_method: Mapping[str, Sequence[Run]], path: Path, metric: str = "loss", title: str = "") -> Path | None:
    """Two panels (by round, by cumulative MB); None when no run holds the metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    by_round, by_mb = fig.subplots(1, 2)
    drawn = False
    for method, runs in runs_by_method.items():
        rounds, mean, std, mb = mean_curve(runs, metric)
        if not rounds:
            continue
        drawn = True
        lo, hi = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
        (line,) = by_round.plot(rounds, mean, marker="o", ms=3, label=f"{method} (n={len(runs)})")
        by_round.fill_between(rounds, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        by_mb.plot(mb, mean, marker="o", ms=3, color=line.get_color(), label=method)
        by_mb.fill_between(mb, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    if not drawn:
        return None
    by_round.set(xlabel="round", ylabel=f"global test {metric}", title=f"{metric} per round (mean ± std over seeds)")
    by_mb.set(xlabel="MB sent, up + down, cumulative", ylabel=f"global test {metric}", title=f"{metric} against communication")
    by_mb.set_xscale("symlog")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_round.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path
