"""`fedlora report`: a markdown summary and PNG plots of one or more run folders.

The numbers come from metrics.jsonl alone (not summary.json), so an interrupted run can be
reported too: the first and last evaluated rounds give "before" and "after".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.evaluation.runs import Run, open_run
from fedlora.report.plots import plot_clients, plot_cost, plot_global, plot_noise, plot_similarity


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """report.md and report-*.png in ``out`` (default: the first run folder); returns report.md."""
    runs = [open_run(p) for p in run_dirs]
    folder = Path(out) if out else runs[0].path
    folder.mkdir(parents=True, exist_ok=True)
    labels = _labels(runs)
    metrics = [r.metrics for r in runs]
    metric = "accuracy" if all(r.cfg.model.task == "classification" for r in runs) else "loss"
    plots = {
        f"Global {metric} against round and bytes": plot_global(metrics, labels, folder / "report-global.png", metric),
        f"Each client's own test {metric}": plot_clients(metrics, labels, folder / "report-clients.png", metric),
        "Aggregation and initialisation noise (agg_noise, init_noise)": plot_noise(metrics, labels, folder / "report-noise.png"),
        "Fed-PLoRA module similarity across clients": plot_similarity(metrics, labels, folder / "report-similarity.png"),
        "Cost per round (wall time, memory)": plot_cost(metrics, labels, folder / "report-cost.png"),
    }
    lines = ["# fedlora report", "", *_overview(runs, labels), ""]
    for title, png in plots.items():
        if png is not None:
            lines += [f"## {title}", "", f"![{title}]({png.name})", ""]
    for run, label in zip(runs, labels):
        lines += [f"## {label}", "", f"`{run.path}` · {_setup(run)}", "", *_interrupted(run), *_client_table(run), ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def _interrupted(run: Run) -> list[str]:
    """A line saying the run stopped early, when its last recorded round is not its last round."""
    last = max((m["round"] for m in run.metrics), default=0)
    if last >= run.cfg.federation.rounds:
        return []
    return [f"**Interrupted after round {last} of {run.cfg.federation.rounds}**: \"after\" is round {last}; "
            f"`fedlora run --resume {run.path}` continues it.", ""]


def before_after(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first and the last evaluation entries' ``eval`` objects."""
    evals = [m["eval"] for m in run.metrics if m.get("eval")]
    return (evals[0], evals[-1]) if evals else ({}, {})


def _labels(runs: list[Run]) -> list[str]:
    names = [r.label for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({i})" for i, n in enumerate(names)]


def _setup(run: Run) -> str:
    c = run.cfg
    ranks = ",".join(str(r) for r in c.client_ranks())
    return f"{c.federation.method}, {c.federation.num_clients} clients, ranks {ranks}, {c.lora.target_modules}, data {c.data.source}"


def _overview(runs: list[Run], labels: list[str]) -> list[str]:
    head = "| run | method | rounds | global loss before → after | accuracy before → after | MB up | MB down | agg_noise (mean) | init_noise (mean) |"
    rows = [head, "|" + "---|" * 9]
    for run, label in zip(runs, labels):
        first, last = before_after(run)
        trained = [m for m in run.metrics if m["round"] > 0]
        loss = _arrow(first.get("global", {}).get("loss"), last.get("global", {}).get("loss"))
        acc = _arrow(first.get("global", {}).get("accuracy"), last.get("global", {}).get("accuracy"))
        up = sum(m.get("bytes_up") or 0 for m in trained) / 1e6
        down = sum(m.get("bytes_down") or 0 for m in trained) / 1e6
        rows.append(
            f"| {label} | {run.cfg.federation.method} | {len(trained)} | {loss} | {acc} | {up:.1f} | {down:.1f} "
            f"| {_num(_mean([m.get('agg_noise') for m in trained]))} | {_num(_mean([m.get('init_noise') for m in trained]))} |"
        )
    return rows


def _client_table(run: Run) -> list[str]:
    first, last = before_after(run)
    ranks = run.cfg.client_ranks()
    rows = ["| client | rank | test loss before | test loss after | Δ |", "|---|---|---|---|---|"]
    for k, before in (first.get("clients") or {}).items():
        b, a = before.get("loss"), (last.get("clients") or {}).get(k, {}).get("loss")
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append(f"| {k} | {ranks[int(k)]} | {_num(b)} | {_num(a)} | {_num(delta)} |")
    return rows


def _mean(xs: list[Any]) -> float | None:
    vals = [float(x) for x in xs if isinstance(x, (int, float)) and x == x]
    return sum(vals) / len(vals) if vals else None


def _num(x: Any) -> str:
    if not isinstance(x, (int, float)) or x != x:
        return "—"
    return f"{x:.2e}" if x != 0 and abs(x) < 1e-3 else f"{x:.4f}"


def _arrow(before: Any, after: Any) -> str:
    return "—" if before is None and after is None else f"{_num(before)} → {_num(after)}"
