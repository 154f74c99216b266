"""The comparison table: per method, mean ± std over seeds of what the runs recorded.

Input is one record per (method, seed) run: ``{"method", "seed", "summary", "metrics"}`` with
the run folder's summary.json and metrics.jsonl lines. Nothing is recomputed here; the columns
are read from those files and averaged.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]

COLUMNS: list[tuple[str, str, int]] = [  # key, header, decimals
    ("loss_before", "global loss before", 4),
    ("loss_after", "global loss after", 4),
    ("accuracy_after", "global accuracy after", 4),
    ("mb_up_per_round", "MB up / round", 2),
    ("mb_down_per_round", "MB down / round", 2),
    ("mb_vs_full", "MB (up+down) vs full", 3),
    ("agg_noise", "mean agg_noise", 4),
    ("init_noise", "mean init_noise", 4),
    ("wall_s_per_round", "wall s / round", 1),
    ("epsilon", "ε spent (client DP)", 2),  # shown only where a run had privacy.mode: client
]


def run_values(rec: Record) -> dict[str, float | None]:
    """One run's numbers for the table's columns."""
    s, metrics = rec["summary"], rec["metrics"]
    rounds = [m for m in metrics if m["round"] > 0]
    n = max(len(rounds), 1)
    acc = s.get("global_accuracy") or {}
    return {
        "loss_before": s["global_loss"]["before"], "loss_after": s["global_loss"]["after"], "accuracy_after": acc.get("after"),
        "mb_up_per_round": s["bytes_up"] / 1e6 / n, "mb_down_per_round": s["bytes_down"] / 1e6 / n,
        "mb_total": (s["bytes_up"] + s["bytes_down"]) / 1e6,
        "agg_noise": s["agg_noise_mean"], "init_noise": s["init_noise_mean"],
        "wall_s_per_round": statistics.fmean(m["wall_s"] for m in rounds) if rounds else None,
        "epsilon": (s.get("privacy") or {}).get("epsilon"),
    }


def mean_std(xs: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite values (std None with fewer than two)."""
    vals = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def table_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per method, in first-seen order: ranks, seeds, and (mean, std) per column."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    values = {m: [run_values(r) for r in records if r["method"] == m] for m in methods}
    full_mb = mean_std([v["mb_total"] for v in values.get("full", [])])[0]
    rows = []
    for m in methods:
        runs = [r for r in records if r["method"] == m]
        for v in values[m]:
            v["mb_vs_full"] = v["mb_total"] / full_mb if full_mb else None
        one = runs[0]["summary"].get("one_rank")
        ranks = runs[0]["summary"].get("ranks")
        row: dict[str, Any] = {
            "method": m, "seeds": len(runs),
            "ranks": f"all {one}" if one else (",".join(map(str, ranks)) if ranks else ""),
        }
        for key, _, _ in COLUMNS:
            row[key] = mean_std([v[key] for v in values[m]])
        rows.append(row)
    return rows


def _cell(ms: tuple[float | None, float | None], digits: int) -> str:
    mean, std = ms
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def write_markdown(rows: Sequence[dict[str, Any]], path: Path, caption: str = "") -> Path:
    cols = [c for c in COLUMNS if any(r[c[0]][0] is not None for r in rows)]
    lines = [
        "| method | ranks | seeds | " + " | ".join(h for _, h, _ in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        lines.append(f"| `{r['method']}` | {r['ranks']} | {r['seeds']} | " + " | ".join(_cell(r[k], d) for k, _, d in cols) + " |")
    path.write_text("\n".join(lines) + "\n" + (f"\n{caption}\n" if caption else ""))
    return path


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    header = ["method", "ranks", "seeds"] + [f"{k}_{s}" for k, _, _ in COLUMNS for s in ("mean", "std")]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([r["method"], r["ranks"], r["seeds"]] + ["" if x is None else x for k, _, _ in COLUMNS for x in r[k]])
    return path
