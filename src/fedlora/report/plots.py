"""PNG plots of runs, from plain per-round metrics dicts (the lines of metrics.jsonl).

Every function takes ``runs`` (one list of per-round dicts per run) and ``labels`` (one per
run), overlays the runs, writes one PNG and returns its path — or None when no run holds the
quantity (a personal method has no noise, only fedplora has module similarity). They know
nothing of run folders, so `fedlora report` and `fedlora compare` share them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

Metrics = Sequence[Mapping[str, Any]]
"""One run: its per-round entries; round 0 is the evaluation before training."""

Getter = Callable[[Mapping[str, Any]], Any]

MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DASHES = ("-", "--", ":", "-.")

FLOOR = 1e-12
"""Noise plots are on a log scale: zeros (exact methods) are drawn here."""


def series(run: Metrics, x: Getter, y: Getter) -> tuple[list[float], list[float]]:
    """(x, y) over the entries where y is a finite number (missing, None and NaN skipped)."""
    xs, ys = [], []
    for entry in run:
        value = y(entry)
        if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            xs.append(float(x(entry)))
            ys.append(float(value))
    return xs, ys


def cumulative_mb(run: Metrics) -> dict[int, float]:
    """Round → megabytes sent up and down in rounds 1..t together (0 before training)."""
    total, out = 0.0, {}
    for entry in run:
        total += (entry.get("bytes_up") or 0) + (entry.get("bytes_down") or 0)
        out[entry["round"]] = total / 1e6
    return out


def global_metric(metric: str) -> Getter:
    return lambda e: (e.get("eval") or {}).get("global", {}).get(metric)


def plot_global(runs: Sequence[Metrics], labels: Sequence[str], path: str | Path, metric: str = "loss") -> Path | None:
    """The global model's held-out metric against round (left) and against megabytes sent (right)."""
    fig, (by_round, by_bytes) = _figure(2)
    drawn = False
    for run, label in zip(runs, labels):
        mb = cumulative_mb(run)
        xs, ys = series(run, lambda e: e["round"], global_metric(metric))
        if xs:
            drawn = True
            by_round.plot(xs, ys, marker="o", label=label)
            by_bytes.plot([mb[int(r)] for r in xs], ys, marker="o", label=label)
    _integer_x(by_round)
    by_round.set(xlabel="round", ylabel=f"global test {metric}", title=f"global {metric} per round")
    by_bytes.set(xlabel="MB sent (up + down, cumulative)", ylabel=f"global test {metric}", title=f"global {metric} per MB")
    return _save(fig, path, drawn)


def plot_clients(runs: Sequence[Metrics], labels: Sequence[str], path: str | Path, metric: str = "loss") -> Path | None:
    """Every client's own test metric against round, one panel per run."""
    fig, axes = _figure(len(runs))
    drawn = False
    for ax, run, label in zip(axes, runs, labels):
        clients = sorted({k for e in run for k in ((e.get("eval") or {}).get("clients") or {})}, key=int)
        for k in clients:
            xs, ys = series(run, lambda e: e["round"], lambda e, k=k: (e.get("eval") or {}).get("clients", {}).get(k, {}).get(metric))
            if xs:
                drawn = True
                ax.plot(xs, ys, marker=".", label=f"client {k}")
        _integer_x(ax)
        ax.set(xlabel="round", ylabel=f"client test {metric}", title=label)
    return _save(fig, path, drawn)


def plot_noise(runs: Sequence[Metrics], labels: Sequence[str], path: str | Path) -> Path | None:
    """agg_noise (the aggregate's distance from the ideal one) and init_noise per round, log scale."""
    fig, axes = _figure(2)
    drawn = False
    for ax, key in zip(axes, ("agg_noise", "init_noise")):
        top = FLOOR * 10
        for i, (run, label) in enumerate(zip(runs, labels)):
            xs, ys = series(run, lambda e: e["round"], lambda e, key=key: e.get(key))
            if xs:
                drawn = True
                # an exact method's 0 shows at the floor; runs on the same values stay apart by marker, size and dash
                ax.plot(xs, [max(y, FLOOR) for y in ys], marker=MARKERS[i % len(MARKERS)], ms=9 - 1.5 * (i % 4), mfc="none",
                        linestyle=DASHES[i % len(DASHES)], label=label)
                top = max(top, *ys)
        _integer_x(ax)
        ax.set(xlabel="round", ylabel=f"{key} (floor {FLOOR:g})", title=key, yscale="log", ylim=(FLOOR / 10, top * 10))
    return _save(fig, path, drawn)


def plot_similarity(runs: Sequence[Metrics], labels: Sequence[str], path: str | Path) -> Path | None:
    """Fed-PLoRA: cosine similarity of one-rank modules across clients, same index vs different index."""
    fig, (ax,) = _figure(1)
    drawn = False
    for run, label in zip(runs, labels):
        for kind, style in (("within", "-"), ("cross", "--")):
            xs, ys = series(run, lambda e: e["round"], lambda e, kind=kind: (e.get("module_similarity") or {}).get(kind))
            if xs:
                drawn = True
                ax.plot(xs, ys, style, marker="o", label=f"{label}: {kind}-index")
    _integer_x(ax)
    ax.set(xlabel="round", ylabel="mean cosine similarity across clients", title="one-rank modules: within vs cross index")
    return _save(fig, path, drawn)


def plot_cost(runs: Sequence[Metrics], labels: Sequence[str], path: str | Path) -> Path | None:
    """Wall seconds and resident memory per round: flat lines say a round costs what the first did."""
    fig, axes = _figure(2)
    drawn = False
    for ax, key, ylabel in zip(axes, ("wall_s", "rss_mb"), ("wall seconds per round", "process RSS after the round (MB)")):
        for run, label in zip(runs, labels):
            xs, ys = series(run, lambda e: e["round"], lambda e, key=key: e.get(key) if e["round"] > 0 else None)  # round 0 only evaluates
            if xs:
                drawn = True
                ax.plot(xs, ys, marker=".", linewidth=1, label=label)
        _integer_x(ax)
        ax.set(xlabel="round", ylabel=ylabel, ylim=(0, None))
    return _save(fig, path, drawn)


def _figure(panels: int) -> tuple[Any, list[Any]]:
    """A Figure on an Agg canvas (no pyplot, no global backend) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * panels, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, list(axes)


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: str | Path, drawn: bool) -> Path | None:
    if not drawn:
        return None
    for ax in fig.axes:
        handles = ax.get_legend_handles_labels()[0]
        if len(handles) > 4:  # many clients or runs: beside the panel, where it hides no curve
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(handles) // 13, borderaxespad=0)
        elif handles:
            ax.legend(fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
