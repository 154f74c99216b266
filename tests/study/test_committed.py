"""The committed studies rebuild, from their records alone, the very tables that are committed beside them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUDIES = sorted(p for p in (ROOT / "studies").glob("*.yaml") if (ROOT / "studies" / p.stem / "cells.csv").is_file())


@pytest.mark.parametrize("spec", STUDIES, ids=lambda p: p.stem)
def test_a_fresh_copy_of_the_records_rebuilds_the_committed_tables(spec, tmp_path):
    committed = spec.parent / spec.stem
    copy = tmp_path / spec.stem
    (copy / "runs").mkdir(parents=True)
    for cell in (committed / "runs").iterdir():  # what a clone holds: the records, no checkpoints, logs or adapters
        if (cell / "summary.json").is_file():
            (copy / "runs" / cell.name).mkdir()
            for name in ("config.yaml", "partition.json", "metrics.jsonl", "summary.json"):
                shutil.copy(cell / name, copy / "runs" / cell.name / name)
    shutil.copy(committed / "cpu.jsonl", copy / "cpu.jsonl")
    res = subprocess.run([sys.executable, "-m", "fedlora.cli", "study", str(spec), "--tables-only", "--output", str(copy)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for table in ("cells.md", "cells.csv", "cells.tex", "paired.md", "paired.csv", "paired.tex"):
        if (committed / table).is_file() or (copy / table).is_file():
            assert (copy / table).read_text() == (committed / table).read_text(), f"{spec.stem}/{table}: rerun --tables-only and commit"
