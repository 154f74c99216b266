"""A study's tables from run folders with known numbers: every figure checked against a hand computation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedlora.app.run_dir import write_json
from fedlora.config import to_yaml
from fedlora.study.report import write_report
from fedlora.study.runner import LEDGER, cell_dir
from fedlora.study.spec import load_study

ROOT = Path(__file__).resolve().parents[2]
T975_DF1 = 12.706204736174707

# final global loss per (method, steps, seed), and the loss curve shape: round 0 → 10 → 20 (last)
FINAL = {("flora", 1, 0): 2.40, ("flora", 1, 1): 2.52, ("fedit", 1, 0): 2.50, ("fedit", 1, 1): 2.66,
         ("flora", 2, 0): 2.30, ("flora", 2, 1): 2.36, ("fedit", 2, 0): 2.20, ("fedit", 2, 1): 2.30}
BYTES = {"flora": (3_000_000, 5_000_000), "fedit": (1_000_000, 1_000_000)}  # up, down per round


def fake_study(tmp: Path):
    spec = tmp / "grid.yaml"
    spec.write_text(f"config: {ROOT / 'configs' / 'tiny.yaml'}\noverrides: [federation.rounds=20]\nseeds: 2\n"
                    "factors:\n  method: [flora, fedit]\n  steps: {key: train.local_steps, values: [1, 2]}\n"
                    "targets: {loss: 2.6}\nreference: fedit\n")
    study = load_study(spec)
    out = tmp / "grid"
    for cell in study.cells():
        method, steps = cell.labels["method"], int(cell.labels["steps"][len("steps"):])
        final = FINAL[(method, steps, cell.seed)]
        folder = cell_dir(out, cell)
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(to_yaml(study.cell_config(cell)))
        up, down = BYTES[method]
        lines = [{"round": 0, "method": method, "clients": [], "eval": {"global": {"loss": 3.0}}, "wall_s": 1.0}]
        for t in range(1, 21):
            line = {"round": t, "method": method, "clients": [], "bytes_up": up, "bytes_down": down, "agg_noise": 0.01 * steps,
                    "init_noise": 0.0, "wall_s": 2.0}
            if t in (10, 20):
                line["eval"] = {"global": {"loss": 2.65 if t == 10 else final}}
            lines.append(line)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        write_json(folder / "summary.json", {"bytes_up": 20 * up, "bytes_down": 20 * down, "agg_noise_mean": 0.01 * steps, "init_noise_mean": 0.0})
        with (out / LEDGER).open("a") as f:
            f.write(json.dumps({"cell": cell.name, "exit": 0, "cpu_s": 360.0, "wall_s": 200.0}) + "\n")
    return study, out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_cells_table_is_mean_and_t_interval_over_seeds(tmp_path):
    study, out = fake_study(tmp_path)
    written = {p.name for p in write_report(study, out)}
    assert {"cells.md", "cells.csv", "cells.tex", "paired.md", "paired.csv", "paired.tex", "summary.md",
            "curves-steps1.png", "curves-steps1.pdf", "curves-steps2.png", "curves-steps2.pdf"} <= written
    rows = {(r["method"], r["steps"]): r for r in read_csv(out / "cells.csv")}
    a, b = FINAL[("flora", 1, 0)], FINAL[("flora", 1, 1)]
    half = T975_DF1 * abs(a - b) / math.sqrt(2) / math.sqrt(2)
    assert rows[("flora", "steps1")]["final loss"] == f"{(a + b) / 2:.4f} ± {half:.4f}"
    assert rows[("flora", "steps1")]["ranks"] == "4…1" and rows[("fedit", "steps1")]["ranks"] == "1"
    assert rows[("flora", "steps1")]["MB / round"] == "8.0000 ± 0.0000"
    # target 2.6: reached at round 20 (MB 20 × 8) where the final loss is below it, never where it is not (fedit seed 1: 2.66)
    assert rows[("flora", "steps1")]["rounds to loss ≤ 2.6"] == "20.00 ± 0.00 (2 reached)"
    assert rows[("fedit", "steps1")]["rounds to loss ≤ 2.6"] == "20.00 (1 reached)"
    assert rows[("fedit", "steps2")]["MB to loss ≤ 2.6"] == "40.00 ± 0.00 (2 reached)"
    assert rows[("flora", "steps2")]["CPU h"] == f"{2 * 360 / 3600:.2f}"


def test_paired_table_is_the_paired_t_test_by_hand_with_holm(tmp_path):
    study, out = fake_study(tmp_path)
    write_report(study, out)
    rows = {r["method"]: r for r in read_csv(out / "paired.csv")}
    assert set(rows) == {"steps1: flora", "steps2: flora"}
    ps = {}
    for steps in (1, 2):
        d = [FINAL[("flora", steps, s)] - FINAL[("fedit", steps, s)] for s in (0, 1)]
        mean, sd = sum(d) / 2, abs(d[0] - d[1]) / math.sqrt(2)
        t = mean / (sd / math.sqrt(2))
        ps[steps] = 1 - 2 * math.atan(abs(t)) / math.pi  # Student t with 1 degree of freedom is Cauchy
        row = rows[f"steps{steps}: flora"]
        assert row["against"] == "fedit" and row["seeds"] == "2"
        assert row["Δ mean ± 95 % CI"] == f"{mean:.4f} ± {T975_DF1 * sd / math.sqrt(2):.4f}"
        assert float(row["t"]) == pytest.approx(t, rel=1e-2)
        assert float(row["p (paired t)"]) == pytest.approx(ps[steps], rel=1e-2)
        assert row["p (sign-flip, exact)"] == "0.5"  # 2 seeds: 2 of the 4 flips are as extreme
    low, high = sorted(ps.values())
    holm = {low: 2 * low, high: max(2 * low, high)}
    for steps in (1, 2):
        assert float(rows[f"steps{steps}: flora"]["p (Holm)"]) == pytest.approx(min(1.0, holm[ps[steps]]), rel=1e-2)
        assert rows[f"steps{steps}: flora"]["verdict"] == "no significant difference"


def test_latex_is_booktabs_and_escaped_and_the_summary_names_what_is_not_significant(tmp_path):
    study, out = fake_study(tmp_path)
    write_report(study, out)
    tex = (out / "cells.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "$\\pm$" in tex and "agg\\_noise" in tex
    assert tex.count("\\\\") == 1 + 4  # header and one row per setting
    summary = (out / "summary.md").read_text()
    assert "Not significant at this many seeds: steps1: flora vs fedit" in summary
    assert "0.8 CPU hours" in summary  # 8 cells × 360 s
