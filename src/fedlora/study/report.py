"""A study's tables and plots, rebuilt from its cells' run folders alone (config, metrics.jsonl, summary.json).

- ``cells.{md,csv,tex}``: per setting, the mean and 95 % CI over seeds of the final global metric,
  bytes, noise, rounds and MB to the target, CPU hours.
- ``paired.{md,csv,tex}``: each method against the reference (or every pair), paired by seed.
- ``curves-<group>.{png,pdf}``: the global metric against round and against MB sent, mean with CI band.
- ``summary.md``: all of it with the machine, the CPU hours, and which differences are significant.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.study.runner import cell_dir, cpu_hours
from fedlora.study.spec import Cell, Study
from fedlora.study.stats import Estimate, Paired, first_reaching, holm, mean_ci, paired

ALPHA = 0.05


@dataclass
class Run:
    """One finished cell: its labels, seed, and what its folder recorded."""

    cell: Cell
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    ranks: list[int]

    def curve(self, metric: str) -> list[tuple[int, float, float | None]]:
        """(round, cumulative MB up+down, global metric) at every evaluated round."""
        out, mb = [], 0.0
        for m in self.metrics:
            mb += (m.get("bytes_up", 0) + m.get("bytes_down", 0)) / 1e6
            if "eval" in m:
                out.append((m["round"], mb, (m["eval"].get("global") or {}).get(metric)))
        return out

    def final(self, metric: str) -> float | None:
        return self.curve(metric)[-1][2]


def load_runs(study: Study, out: Path) -> tuple[list[Run], int]:
    """The finished cells' records, and how many cells are not finished."""
    import yaml

    runs, missing = [], 0
    for cell in study.cells():
        folder = cell_dir(out, cell)
        if not (folder / "summary.json").is_file():
            missing += 1
            continue
        metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
        lora = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("lora", {})
        ranks = lora.get("ranks") or [lora.get("rank")]
        runs.append(Run(cell, metrics, json.loads((folder / "summary.json").read_text()), ranks))
    return runs, missing


def compared_factor(study: Study) -> str:
    return study.compared


def group_of(cell: Cell, factor: str) -> str:
    """The cell's setting without the compared factor: the runs that can be paired."""
    return "-".join(v for k, v in cell.labels.items() if k != factor) or "all"


def cell_rows(study: Study, runs: list[Run], out: Path) -> list[dict[str, Any]]:
    """One row per setting: factors, seeds, and each column's mean ± 95 % CI over seeds."""
    metric, hours = study.metric, cpu_hours(out)
    target = study.targets.get(metric)
    rows = []
    for setting in dict.fromkeys(r.cell.setting for r in runs):
        mine = [r for r in runs if r.cell.setting == setting]
        per_round = [max(len([m for m in r.metrics if m["round"] > 0]), 1) for r in mine]
        row: dict[str, Any] = dict(mine[0].cell.labels)
        ranks = mine[0].ranks
        row["ranks"] = str(ranks[0]) if len(set(ranks)) == 1 else f"{max(ranks)}…{min(ranks)}"
        row["seeds"] = len(mine)
        row[f"final {metric}"] = mean_ci([r.final(metric) for r in mine])
        row["MB / round"] = mean_ci([(r.summary["bytes_up"] + r.summary["bytes_down"]) / 1e6 / n for r, n in zip(mine, per_round)])
        row["agg_noise"] = mean_ci([r.summary.get("agg_noise_mean") for r in mine])
        row["init_noise"] = mean_ci([r.summary.get("init_noise_mean") for r in mine])
        if target is not None:
            reached = [first_reaching([(rd, v) for rd, _, v in r.curve(metric)], target, metric == "loss") for r in mine]
            mbs = [first_reaching([(mb, v) for _, mb, v in r.curve(metric)], target, metric == "loss") for r in mine]
            goal = f"{metric} {'≤' if metric == 'loss' else '≥'} {target:g}"
            row[f"rounds to {goal}"] = (mean_ci(reached), sum(x is not None for x in reached))
            row[f"MB to {goal}"] = (mean_ci(mbs), sum(x is not None for x in mbs))
        spent = [hours.get(r.cell.name, (0.0, False)) for r in mine]
        row["CPU h"] = ("" if all(known for _, known in spent) else "≥ ") + f"{sum(h for h, _ in spent):.2f}"
        rows.append(row)
    return rows


def paired_rows(study: Study, runs: list[Run]) -> list[Paired]:
    """Every level of the compared factor against the reference (or every pair), within each group, paired by seed; Holm over all."""
    factor, metric = compared_factor(study), study.metric
    results: list[Paired] = []
    groups = dict.fromkeys(group_of(r.cell, factor) for r in runs)
    for group in groups:
        by_level: dict[str, dict[int, float | None]] = {}
        for r in runs:
            if group_of(r.cell, factor) == group:
                by_level.setdefault(r.cell.labels.get(factor, ""), {})[r.cell.seed] = r.final(metric)
        levels = list(by_level)
        ref = study.reference if study.reference in by_level else None
        pairs = [(a, ref) for a in levels if a != ref] if ref else [(a, b) for i, a in enumerate(levels) for b in levels[i + 1:]]
        for a, b in pairs:
            res = paired(f"{group}: {a}" if len(groups) > 1 else a, b, by_level[a], by_level[b])
            if res is not None:
                results.append(res)
    return holm(results)


def verdict(p: Paired, metric: str) -> str:
    if p.p_holm is None:
        return "cannot tell (fewer than 2 seeds)"
    if p.p_holm >= ALPHA:
        return "no significant difference"
    better = p.diff.mean < 0 if metric == "loss" else p.diff.mean > 0
    return f"{'better' if better else 'worse'} than {p.b} (significant)"


# ---- formatting ---------------------------------------------------------------------------------

def _cell_text(v: Any) -> str:
    if isinstance(v, Estimate):
        digits = 2 if abs(v.mean) >= 10 else 4
        return v.text(digits)
    if isinstance(v, tuple):  # (estimate of the seeds that reached, how many reached)
        est, k = v
        return "—" if est is None else f"{_cell_text(est)} ({k} reached)"
    if isinstance(v, float):
        return f"{v:.2f}"
    return "—" if v is None else str(v)


def _paired_cells(p: Paired, metric: str) -> list[str]:
    fmt = lambda x: "—" if x is None else f"{x:.3g}"  # noqa: E731
    return [p.a, p.b, str(p.n), p.diff.text(4), fmt(p.t), fmt(p.p), fmt(p.p_holm), fmt(p.p_signflip), verdict(p, metric)]


PAIRED_HEADER = ["method", "against", "seeds", "Δ mean ± 95 % CI", "t", "p (paired t)", "p (Holm)", "p (sign-flip, exact)", "verdict"]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]) + "\n"


def latex(header: list[str], rows: list[list[str]], caption: str) -> str:
    """A booktabs table."""
    def tex(s: str) -> str:
        s = s.replace("\\", "\\textbackslash{}")
        for ch in "&%$#_{}":
            s = s.replace(ch, "\\" + ch)
        return s.replace("±", "$\\pm$").replace("Δ", "$\\Delta$").replace("…", "\\ldots{}").replace("—", "--").replace("~", "\\~{}")
    cols = "l" * len(header)
    body = [" & ".join(tex(c) for c in r) + " \\\\" for r in rows]
    return "\n".join(["\\begin{table}[t]", "\\centering", f"\\caption{{{tex(caption)}}}", f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
                      " & ".join(tex(h) for h in header) + " \\\\", "\\midrule", *body, "\\bottomrule", "\\end{tabular}", "\\end{table}", ""])


def write_table(out: Path, stem: str, header: list[str], rows: list[list[str]], caption: str) -> list[Path]:
    paths = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.tex"]
    paths[0].write_text(markdown(header, rows))
    with paths[1].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    paths[2].write_text(latex(header, rows, caption))
    return paths


def cells_csv_values(row: dict[str, Any]) -> list[str]:
    return [_cell_text(v) for v in row.values()]


# ---- plots --------------------------------------------------------------------------------------

def plot_curves(study: Study, runs: list[Run], out: Path) -> list[Path]:
    """Per group: the global metric against round and against cumulative MB, one line per level, 95 % CI band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factor, metric = compared_factor(study), study.metric
    paths = []
    for group in dict.fromkeys(group_of(r.cell, factor) for r in runs):
        mine = [r for r in runs if group_of(r.cell, factor) == group]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
        for level in dict.fromkeys(r.cell.labels.get(factor, "") for r in mine):
            curves = [r.curve(metric) for r in mine if r.cell.labels.get(factor, "") == level]
            rounds = sorted(set.intersection(*(set(rd for rd, _, _ in c) for c in curves)))
            stats_at = [mean_ci([dict((rd, v) for rd, _, v in c).get(t) for c in curves]) for t in rounds]
            mb_at = [math.fsum(dict((rd, mb) for rd, mb, _ in c)[t] for c in curves) / len(curves) for t in rounds]
            keep = [(t, mb, e) for t, mb, e in zip(rounds, mb_at, stats_at) if e is not None]
            if not keep:
                continue
            for ax, xs in zip(axes, ([t for t, _, _ in keep], [mb for _, mb, _ in keep])):
                ys = [e.mean for _, _, e in keep]
                line, = ax.plot(xs, ys, marker=".", label=f"{level} (n={len(curves)})")
                if all(e.half is not None for _, _, e in keep):
                    ax.fill_between(xs, [e.mean - e.half for _, _, e in keep], [e.mean + e.half for _, _, e in keep],  # type: ignore[operator]
                                    color=line.get_color(), alpha=0.15, linewidth=0)
        axes[0].set(xlabel="round", ylabel=f"global test {metric}", title=f"{study.name} · {group}: against round")
        axes[1].set(xlabel="MB sent (up + down, cumulative)", title="against communication")
        axes[1].set_xscale("symlog", linthresh=1.0)
        axes[0].xaxis.get_major_locator().set_params(integer=True)
        if metric in study.targets:
            for ax in axes:
                ax.axhline(study.targets[metric], color="grey", linestyle=":", linewidth=1)
        axes[0].legend(fontsize=8, loc="best")
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.text(0.01, 0.01, "lines: mean over seeds; bands: 95 % t interval", fontsize=7, color="grey")
        fig.tight_layout()
        for ext in ("png", "pdf"):
            path = out / f"curves-{group}.{ext}"
            fig.savefig(path, dpi=130)
            paths.append(path)
        plt.close(fig)
    return paths


# ---- the report ---------------------------------------------------------------------------------

def write_report(study: Study, out: Path) -> list[Path]:
    """Every table and plot of the study from its finished cells; nothing runs."""
    from fedlora.app.compare import machine_line

    runs, missing = load_runs(study, out)
    if not runs:
        return []
    metric = study.metric
    rows = cell_rows(study, runs, out)
    header = list(rows[0])
    cell_table = [cells_csv_values(r) for r in rows]
    comparisons = paired_rows(study, runs)
    paired_table = [_paired_cells(p, metric) for p in comparisons]
    spent = cpu_hours(out)
    hours = sum(h for h, _ in spent.values())
    lower = "at least " if not all(known for _, known in spent.values()) else ""
    caption = (f"{study.title or study.name}: mean ± 95 % CI over seeds; final global test {metric}; "
               f"{len(runs)} runs, {lower}{hours:.1f} CPU h")
    paths = write_table(out, "cells", header, cell_table, caption)
    if paired_table:
        paths += write_table(out, "paired", PAIRED_HEADER, paired_table,
                             f"{study.title or study.name}: paired by seed, Δ = method − reference of the final global test {metric}; paired t-test, Holm-adjusted over this table")
    paths += plot_curves(study, runs, out)
    paths.append(_summary(study, out, rows, header, cell_table, comparisons, paired_table, missing, f"{lower}{hours:.1f}", machine_line()))
    return paths


def _summary(study: Study, out: Path, rows: list[dict[str, Any]], header: list[str], cell_table: list[list[str]], comparisons: list[Paired],
             paired_table: list[list[str]], missing: int, hours: str, machine: str) -> Path:
    metric = study.metric
    significant = [p for p in comparisons if p.p_holm is not None and p.p_holm < ALPHA]
    rest = [p for p in comparisons if p not in significant]
    lines = [f"# {study.title or study.name}", "",
             f"`fedlora study {study.path.name}` · seeds {list(study.seeds)} · {len(cell_table)} settings · "
             f"{missing} cells not finished · {hours} CPU hours (the processes' own CPU time, resumes included; ≥: a process not measured) · {machine}", "",
             f"## Final global test {metric}, mean ± 95 % CI over seeds", "", markdown(header, cell_table)]
    if paired_table:
        lines += ["## Paired differences (same seed: same partition, clients and held-out examples)", "",
                  "Paired t-test on the per-seed differences, two-sided, Holm-adjusted over the table; the exact sign-flip p is "
                  f"beside it (it cannot go below 2/2ⁿ). Significant: Holm p < {ALPHA}.", "", markdown(PAIRED_HEADER, paired_table)]
        lines += ["## What the statistics say", ""]
        lines += [f"- **{p.a}** is {verdict(p, metric)}: Δ {p.diff.text(4)} (Holm p = {p.p_holm:.3g}, n = {p.n})." for p in significant]
        if rest:
            lines += [f"- Not significant at this many seeds: {', '.join(f'{p.a} vs {p.b} (Δ {p.diff.text(4)})' for p in rest)}."]
    lines += ["", "Curves: " + ", ".join(f"[{p.name}]({p.name})" for p in sorted(out.glob("curves-*.png")))]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
