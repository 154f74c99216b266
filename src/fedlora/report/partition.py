"""What a partition looks like: a per-client table for the terminal and a clients × categories heatmap PNG."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.table import Table

OTHER = "(other)"


def partition_table(parts: Sequence[Sequence[int]], categories: Sequence[str], *, top: int = 3, title: str | None = None) -> Table:
    """One row per client: its size, share of the data, number of distinct categories and the `top` largest."""
    total = sum(len(p) for p in parts) or 1
    table = Table(title=title or f"partition · {len(parts)} clients · {total} examples · {len(set(categories))} categories")
    for column, justify in (("client", "right"), ("examples", "right"), ("share", "right"), ("categories", "right"), ("top categories", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for client, part in enumerate(parts):
        counts = Counter(categories[i] for i in part)
        common = ", ".join(f"{name or '—'} {n}" for name, n in counts.most_common(top))
        table.add_row(str(client), str(len(part)), f"{100 * len(part) / total:.1f}%", str(len(counts)), common)
    return table


def count_matrix(
    parts: Sequence[Sequence[int]], categories: Sequence[str], *, max_categories: int = 40
) -> tuple[np.ndarray, list[str]]:
    """(clients, columns) example counts; columns are categories in name order, the rarest folded into '(other)'."""
    totals = Counter(categories[i] for part in parts for i in part)
    names = sorted(totals)
    if len(names) > max_categories:
        kept = {name for name, _ in totals.most_common(max_categories - 1)}
        names = sorted(kept) + [OTHER]
    column = {name: j for j, name in enumerate(names)}
    matrix = np.zeros((len(parts), len(names)), dtype=np.int64)
    for client, part in enumerate(parts):
        for i in part:
            matrix[client, column.get(categories[i], len(names) - 1)] += 1
    return matrix, names


def partition_heatmap(
    parts: Sequence[Sequence[int]], categories: Sequence[str], path: str | Path, title: str, *, max_categories: int = 40
) -> Path:
    """Write a PNG heatmap: one row per client, one column per category, colour = examples; counts written in small grids."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg canvas directly: no pyplot, no global backend
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    matrix, names = count_matrix(parts, categories, max_categories=max_categories)
    rows, cols = matrix.shape
    fig = Figure(figsize=(max(6.0, 1.6 + 0.42 * cols), max(3.0, 1.9 + 0.36 * rows)), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = np.ma.masked_equal(matrix, 0)  # empty cells stay white: the skew is the white space
    vmax = max(int(matrix.max()), 2)
    image = ax.imshow(shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=vmax), aspect="auto", interpolation="nearest")
    ax.set_facecolor("white")
    ax.set_xticks(range(cols), [n or "(none)" for n in names], rotation=55, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(rows), [f"client {c}  (n={int(matrix[c].sum())})" for c in range(rows)], fontsize=8)
    ax.set_xticks(np.arange(cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("category")
    ax.set_title(title, fontsize=10)
    if rows * cols <= 600:
        size = 7 if matrix.max() < 1000 else 5.5
        threshold = np.sqrt(vmax)  # the middle of the log colour scale: dark cells below it, light above
        for (r, c), value in np.ndenumerate(matrix):
            if value:
                colour = "white" if value < threshold else "black"
                ax.text(c, r, str(value), ha="center", va="center", fontsize=size, color=colour)
    fig.colorbar(image, ax=ax, label="examples (log scale)", shrink=0.9, pad=0.01)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
