"""partition_table and partition_heatmap: the numbers they show and a real PNG on disk."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from rich.console import Console

from fedlora.data import partition
from fedlora.report.partition import OTHER, count_matrix, partition_heatmap, partition_table

CATEGORIES = ["ai"] * 6 + ["food"] * 3 + ["sports"] * 1
PARTS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # client 0: ai 4; client 1: ai 2, food 1; client 2: food 2, sports 1


def _render(table: object) -> str:
    console = Console(width=120, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_table_rows_sizes_and_top_categories() -> None:
    table = partition_table(PARTS, CATEGORIES, top=2)
    assert table.row_count == 3
    assert [c.header for c in table.columns] == ["client", "examples", "share", "categories", "top categories"]
    rendered = _render(table)
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in rendered.splitlines() if line.startswith("│")]
    assert rows == [
        ["0", "4", "40.0%", "1", "ai 4"],
        ["1", "3", "30.0%", "2", "ai 2, food 1"],
        ["2", "3", "30.0%", "2", "food 2, sports 1"],
    ]
    assert "3 clients · 10 examples · 3 categories" in rendered


def test_count_matrix_and_folding_rare_categories() -> None:
    matrix, names = count_matrix(PARTS, CATEGORIES)
    assert names == ["ai", "food", "sports"]
    assert matrix.tolist() == [[4, 0, 0], [2, 1, 0], [0, 2, 1]]
    folded, folded_names = count_matrix(PARTS, CATEGORIES, max_categories=2)
    assert folded_names == ["ai", OTHER]
    assert folded.tolist() == [[4, 0], [2, 1], [0, 3]]
    assert folded.sum() == len(CATEGORIES)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_heatmap_writes_a_real_png(tmp_path: Path) -> None:
    categories = [f"topic_{i % 21:02d}" for i in range(2100)]
    parts = partition(categories, 10, "dirichlet", alpha=0.1, seed=0)
    out = partition_heatmap(parts, categories, tmp_path / "nested" / "heat.png", "dirichlet α=0.1")
    assert out == tmp_path / "nested" / "heat.png"
    width, height = _png_size(out)
    assert 700 < width < 3000 and 350 < height < 2000 and width > height  # 21 columns, 10 rows
    assert out.stat().st_size > 20_000

    from PIL import Image

    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape == (height, width, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a coloured grid with text, not a blank canvas


def test_heatmap_with_many_categories_stays_readable(tmp_path: Path) -> None:
    categories = [f"movie_{i % 300}" for i in range(3000)]
    parts = partition(categories, 5, "iid", seed=0)
    width, height = _png_size(partition_heatmap(parts, categories, tmp_path / "many.png", "300 categories"))
    assert width < 3000 and height < 1200  # folded to 40 columns, not 300
