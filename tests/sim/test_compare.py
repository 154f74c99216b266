"""`fedlora compare` on a tiny random Llama: 2 methods × 2 seeds × 1 round, same partitions, table, CSV, PNG."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from fedlora.cli import main
from tests.evaluation.tiny_run import TARGETS, tiny_model_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hidden size 32: threads only wait on each other, and on a busy machine that wait dominates."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    base = tiny_model_dir(root / "tiny-llama")
    cfg = {
        "model": {"path": str(base)},
        "lora": {"ranks": [2, 1, 1], "scale": 2.0, "target_modules": TARGETS},
        "data": {"source": "chatterbot", "partition": "dirichlet", "alpha": 0.5, "max_examples": 60},
        "federation": {"method": "flora", "rounds": 1, "num_clients": 3},
        "train": {"local_steps": 1, "batch_size": 4, "micro_batch_size": 4, "max_length": 48},
        "eval": {"batch_size": 8, "max_examples": 6},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def compared(config: Path) -> Path:
    out = config.parent / "cmp"
    assert main(["compare", str(config), "--methods", "flora,fedit", "--seeds", "2", "--output", str(out), "eval.every=1"]) == 0
    return out


def _summary(out: Path, method: str, seed: int) -> dict:
    return json.loads((out / "runs" / f"{method}-seed{seed}" / "summary.json").read_text())


def test_every_run_on_the_same_partition_per_seed(compared: Path) -> None:
    for seed in (0, 1):
        parts = [json.loads((compared / "runs" / f"{m}-seed{seed}" / "partition.json").read_text()) for m in ("flora", "fedit")]
        assert [c["train_indices"] for c in parts[0]["clients"]] == [c["train_indices"] for c in parts[1]["clients"]]
        first = [json.loads((compared / "runs" / f"{m}-seed{seed}" / "metrics.jsonl").read_text().splitlines()[0]) for m in ("flora", "fedit")]
        assert first[0]["eval"]["global"]["loss"] == first[1]["eval"]["global"]["loss"]  # same model, head and test split before training
    s0 = json.loads((compared / "runs" / "flora-seed0" / "partition.json").read_text())
    s1 = json.loads((compared / "runs" / "flora-seed1" / "partition.json").read_text())
    assert s0["global_test_indices"] == s1["global_test_indices"]  # every seed scored on the same held-out examples
    assert [c["train_indices"] for c in s0["clients"]] != [c["train_indices"] for c in s1["clients"]]  # while the partitions differ


def test_vary_test_split_draws_a_global_test_split_per_seed(config: Path) -> None:
    from fedlora.app.compare import make_plan
    from fedlora.config import load_config
    from fedlora.federation.experiment import split_indices

    categories = [f"c{i % 4}" for i in range(80)]
    for vary, same in ((False, True), (True, False)):
        plan = make_plan(str(config), "flora", 2, [], vary_test=vary)
        cfgs = [load_config(plan.config, [*plan.overrides, f"seed={s}"]) for s in plan.seeds]
        tests = [split_indices(c, categories)["global_test_indices"] for c in cfgs]
        assert (tests[0] == tests[1]) is same, (vary, tests)


def test_fedit_falls_back_to_one_rank(compared: Path) -> None:
    assert _summary(compared, "fedit", 0)["ranks"] == [1, 1, 1] and _summary(compared, "fedit", 0)["one_rank"] == 1
    assert _summary(compared, "flora", 0)["ranks"] == [2, 1, 1]


def test_table_holds_mean_and_std_over_seeds(compared: Path) -> None:
    rows = {r["method"]: r for r in csv.DictReader((compared / "table.csv").open())}
    assert set(rows) == {"flora", "fedit"} and rows["fedit"]["ranks"] == "all 1"
    for m in ("flora", "fedit"):
        after = [_summary(compared, m, s)["global_loss"]["after"] for s in (0, 1)]
        assert float(rows[m]["loss_after_mean"]) == pytest.approx(statistics.fmean(after))
        assert float(rows[m]["loss_after_std"]) == pytest.approx(statistics.stdev(after))
        ups = [_summary(compared, m, s)["bytes_up"] / 1e6 for s in (0, 1)]
        assert float(rows[m]["mb_up_per_round_mean"]) == pytest.approx(statistics.fmean(ups))
    md = (compared / "table.md").read_text()
    assert "| `flora` | 2,1,1 | 2 |" in md and "| `fedit` | all 1 | 2 |" in md and " ± " in md
    assert (compared / "loss.png").stat().st_size > 1000


def test_finished_runs_are_reused(compared: Path, config: Path) -> None:
    stamp = (compared / "runs" / "flora-seed0" / "summary.json").stat().st_mtime_ns
    assert main(["compare", str(config), "--methods", "flora", "--seeds", "1", "--output", str(compared), "eval.every=1"]) == 0
    assert (compared / "runs" / "flora-seed0" / "summary.json").stat().st_mtime_ns == stamp


def test_tables_only_runs_nothing(compared: Path, config: Path) -> None:
    args = ["compare", str(config), "--methods", "flora,fedit,zeropad", "--seeds", "2", "--output", str(compared), "--tables-only", "eval.every=1"]
    assert main(args) == 0
    assert not (compared / "runs" / "zeropad-seed0").exists()
    rows = {r["method"]: r for r in csv.DictReader((compared / "table.csv").open())}
    assert set(rows) == {"flora", "fedit"} and rows["flora"]["seeds"] == "2"


def test_bad_methods_fail_with_one_line(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", str(config), "--methods", "flora,nope", "--seeds", "2", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--methods" in err and "'nope'" in err and "flora" in err
    assert not (tmp_path / "x").exists()


def test_compare_ends_by_printing_the_table_it_wrote(config: Path, compared: Path, capsys) -> None:
    assert main(["compare", str(config), "--methods", "flora,fedit", "--seeds", "2", "--output", str(compared), "--tables-only", "eval.every=1"]) == 0
    out = capsys.readouterr().out
    assert "| method |" in out and "`flora`" in out and "`fedit`" in out
    assert out.count("\n| `") == (compared / "table.md").read_text().count("\n| `")


def test_every_compared_run_keeps_its_final_adapter(compared: Path) -> None:
    for run in (compared / "runs").iterdir():
        assert (run / "final" / "adapter_model.safetensors").is_file(), run


def test_a_run_scored_on_another_test_split_is_run_again_not_mixed_in(compared: Path, config: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    folder = out / "runs" / "flora-seed0"
    assert yaml.safe_load((folder / "config.yaml").read_text())["data"]["global_test_seed"] == 0
    stamp = (folder / "summary.json").stat().st_mtime_ns
    assert main(["compare", str(config), "--methods", "flora", "--seeds", "1", "--output", str(out), "eval.every=1", "--vary-test-split"]) == 0
    assert (folder / "summary.json").stat().st_mtime_ns != stamp  # rerun on the split the plan asks for
    assert yaml.safe_load((folder / "config.yaml").read_text())["data"]["global_test_seed"] is None
