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
    """Two panels: by round with ±std bars (dodged so they do not hide each other), and by cumulative MB on a log axis
    (rounds after the first upload; a comparison's MB span decades). None when no run holds the metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    by_round, by_mb = fig.subplots(1, 2)
    curves = [(m, len(runs), *mean_curve(runs, metric)) for m, runs in runs_by_method.items()]
    curves = [c for c in curves if c[2]]
    if not curves:
        return None
    width = 0.25 / max(1, len(curves) - 1) if len(curves) > 1 else 0.0
    for i, (method, n, rounds, mean, std, mb) in enumerate(curves):
        dodge = (i - (len(curves) - 1) / 2) * width
        bars = by_round.errorbar([r + dodge for r in rounds], mean, yerr=std if n > 1 else None, marker="o", ms=3, capsize=2,
                                 elinewidth=0.8, label=f"{method} (n={n})")
        sent = [(x, y) for x, y in zip(mb, mean) if x > 0]
        if sent:
            by_mb.plot(*zip(*sent), marker="o", ms=3, color=bars.lines[0].get_color(), label=method)
    spread = " ± std over seeds" if any(c[1] > 1 for c in curves) else ""
    by_round.set(xlabel="round", ylabel=f"global test {metric}", title=f"{metric} per round (mean{spread})")
    by_mb.set(xlabel="MB sent, up + down, cumulative (log)", ylabel=f"global test {metric}", title=f"{metric} against communication (mean)")
    if by_mb.lines:
        by_mb.set_xscale("log")
        by_mb.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        by_mb.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        by_mb.xaxis.set_minor_formatter(NullFormatter())
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_round.legend(fontsize=8)
    if by_mb.lines:
        by_mb.legend(fontsize=8)
    for ax in (by_round, by_mb):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path
