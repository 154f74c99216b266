"""`fedlora compare` on a tiny random Llama: 2 methods × 2 seeds × 1 round, same partitions, table, CSV, PNG."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from fedlora.cli import main
from fedlora.config import ConfigError
from tests.evaluation.tiny_run import tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:  # one thread before the module's runs start
    return tiny_config(tmp_path_factory.mktemp("compare"))


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


def test_finished_runs_are_reused_and_named_in_one_log_line(compared: Path, config: Path, caplog: pytest.LogCaptureFixture) -> None:
    stamp = (compared / "runs" / "flora-seed0" / "summary.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert main(["compare", str(config), "--methods", "flora", "--seeds", "1", "--output", str(compared), "eval.every=1"]) == 0
    assert (compared / "runs" / "flora-seed0" / "summary.json").stat().st_mtime_ns == stamp
    lines = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    assert len(lines) == 1 and str(compared / "runs" / "flora-seed0") in lines[0] and "fedit" not in lines[0], lines


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


def _error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err  # one line, no traceback
    return err


def _files(out: Path) -> dict[Path, int]:
    """Every file under out/runs with its modification time: what compare must leave as it was."""
    return {f: f.stat().st_mtime_ns for f in (out / "runs").rglob("*") if f.is_file()}


def test_a_run_scored_on_another_test_split_is_refused_not_mixed_in(compared: Path, config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    folder = out / "runs" / "flora-seed0"
    assert yaml.safe_load((folder / "config.yaml").read_text())["data"]["global_test_seed"] == 0
    before = _files(out)
    assert main(["compare", str(config), "--methods", "flora", "--seeds", "1", "--output", str(out), "eval.every=1", "--vary-test-split"]) == 2
    err = _error_line(capsys)
    assert str(folder) in err and "data.global_test_seed=0 there, None in this comparison" in err and "move" in err
    assert _files(out) == before  # neither rerun nor deleted


def test_a_comparison_of_other_settings_into_the_same_output_stops_before_any_work(compared: Path, config: Path, tmp_path: Path, capsys) -> None:
    """The old reuse check read only the test split's seed: this exited 0 with the first comparison's numbers."""
    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    before, plan = _files(out), (out / "plan.json").read_text()
    args = ["compare", str(config), "--methods", "flora,fedit", "--seeds", "2", "--output", str(out), "eval.every=1", "train.lr=0.001"]
    assert main(args) == 2
    err = _error_line(capsys)
    assert str(out / "runs" / "flora-seed0") in err and "train.lr=0.0002 there, 0.001 in this comparison" in err and "move" in err
    assert _files(out) == before and (out / "plan.json").read_text() == plan


def test_the_summary_holds_the_digest_of_the_run_config_without_output(compared: Path) -> None:
    from fedlora.app.compare import MARK, config_digest
    from fedlora.config import load_config

    for run in (compared / "runs").iterdir():
        cfg = load_config(run / "config.yaml", [])
        digest = config_digest(cfg)
        assert len(digest) == 64 and json.loads((run / "summary.json").read_text())["config_digest"] == digest
        assert (run / MARK).read_text().strip() == digest  # compare made this folder
    cfg_path = compared / "runs" / "flora-seed0" / "config.yaml"
    digest = config_digest(load_config(cfg_path, []))
    assert config_digest(load_config(cfg_path, ["output.dir=/elsewhere", "output.save_final=false"])) == digest
    assert config_digest(load_config(cfg_path, ["train.lr=0.001"])) != digest
    assert config_digest(load_config(cfg_path, ["eval.every=2"])) != digest


def test_a_foreign_folder_in_the_way_is_named_and_kept(config: Path, tmp_path: Path, capsys) -> None:
    """The old compare deleted whatever sat at OUT/runs/<method>-seed<s> without a summary.json."""
    out = tmp_path / "cmp"
    folder = out / "runs" / "flora-seed0"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    assert main(["compare", str(config), "--methods", "flora", "--seeds", "1", "--output", str(out), "eval.every=1"]) == 2
    err = _error_line(capsys)
    assert str(folder) in err and "compare did not write" in err and "move" in err
    assert list(folder.iterdir()) == [folder / "notes.txt"] and (folder / "notes.txt").read_text() == "mine"


def test_a_finished_run_compare_did_not_record_is_refused_when_it_differs(compared: Path, config: Path, tmp_path: Path, capsys) -> None:
    """A finished run without a digest (a fedlora before digests, or another command): its config.yaml decides."""
    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    folder = out / "runs" / "flora-seed0"
    summary = json.loads((folder / "summary.json").read_text())
    del summary["config_digest"]
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / ".fedlora-compare").unlink()
    before = _files(out)
    args = ["compare", str(config), "--methods", "flora", "--seeds", "1", "--output", str(out), "eval.every=1"]
    assert main([*args, "train.weight_decay=0.1"]) == 2
    err = _error_line(capsys)
    assert str(folder) in err and "train.weight_decay=0.0 there, 0.1 in this comparison" in err
    assert main(args) == 0  # the same settings as its config.yaml: reused, not run again
    assert _files(out) == before


def test_an_unfinished_compare_run_of_other_settings_is_named_and_kept(compared: Path, config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    folder = out / "runs" / "flora-seed0"
    (folder / "summary.json").unlink()  # interrupted before its summary
    before = _files(out)
    assert main(["compare", str(config), "--methods", "flora", "--seeds", "1", "--output", str(out), "eval.every=1", "train.lr=0.001"]) == 2
    err = _error_line(capsys)
    assert str(folder) in err and "unfinished" in err and "train.lr=0.0002 there, 0.001 in this comparison" in err
    assert _files(out) == before


def test_compare_starts_its_own_unfinished_run_again(compared: Path, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(compared, out)
    folder = out / "runs" / "flora-seed0"
    (folder / "summary.json").unlink()
    (folder / "metrics.jsonl").write_text('{"round": 0, "left": "by the interrupted attempt"}\n')
    kept = (out / "runs" / "fedit-seed0" / "summary.json").stat().st_mtime_ns
    assert main(["compare", str(config), "--methods", "flora,fedit", "--seeds", "1", "--output", str(out), "eval.every=1"]) == 0
    assert "interrupted attempt" not in (folder / "metrics.jsonl").read_text()
    assert _summary(out, "flora", 0)["config_digest"] == _summary(compared, "flora", 0)["config_digest"]
    assert (out / "runs" / "fedit-seed0" / "summary.json").stat().st_mtime_ns == kept


def test_tables_only_reads_the_results_without_the_model(compared: Path, config: Path, monkeypatch) -> None:
    from fedlora.app import compare as compare_module
    from fedlora.config import ConfigError

    def no_model(cfg):
        raise ConfigError("model.path: no HF model folder")

    monkeypatch.setattr(compare_module, "check_model", no_model)
    plan = compare_module.make_plan(str(config), "flora,fedit", 2, ["eval.every=1"])
    records = compare_module.finished(plan, compared)
    assert sorted((r["method"], r["seed"]) for r in records) == [("fedit", 0), ("fedit", 1), ("flora", 0), ("flora", 1)]


def test_methods_from_outside_are_accepted_by_path(outside) -> None:
    from fedlora.app.compare import parse_methods

    assert parse_methods(f"flora,{outside}:OneRank,flora") == ["flora", f"{outside}:OneRank"]
    with pytest.raises(ConfigError, match=r"^--methods: unknown value 'nosuch_pkg:X' \(accepted: comma-separated names from flora, .*, or package\.module:Class\)$"):
        parse_methods("flora,nosuch_pkg:X")


def test_round_0_is_evaluated_once_per_seed_and_equals_a_runs_own(config: Path, tmp_path: Path, monkeypatch) -> None:
    from fedlora.federation.server import Server

    calls = []
    real = Server.round_zero
    monkeypatch.setattr(Server, "round_zero", lambda self: calls.append(self.exp.cfg.federation.method) or real(self))
    out = tmp_path / "cmp"
    assert main(["compare", str(config), "--methods", "flora,fedit,zeropad", "--seeds", "1", "--output", str(out)]) == 0
    assert calls == ["flora"]  # the untrained model once, not once per method
    alone = tmp_path / "alone"
    assert main(["run", str(config), "federation.method=zeropad", f"output.dir={alone}", "data.global_test_seed=0"]) == 0
    first = lambda folder: json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    for method in ("fedit", "zeropad"):
        shared = first(out / "runs" / f"{method}-seed0")
        assert shared["method"] == method and shared["eval"] == first(out / "runs" / "flora-seed0")["eval"]
    assert first(out / "runs" / "zeropad-seed0")["eval"] == first(alone)["eval"]  # what zeropad's own evaluation gives
