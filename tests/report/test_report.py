"""fedlora report on hand-made run folders: numbers in the markdown, plots from plain metrics dicts."""

import json
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.config import build_config, to_yaml
from fedlora.report.plots import cumulative_mb, plot_global, plot_noise, plot_similarity, series

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(method: str, losses: list[float], noise: float | None, similarity: bool = False) -> list[dict]:
    out = []
    for r, loss in enumerate(losses):
        entry = {"round": r, "method": method, "eval": {"global": {"loss": loss}, "clients": {"0": {"loss": loss + 1}, "1": {"loss": loss - 1}}}}
        if r:
            entry.update(bytes_up=1_000_000 * r, bytes_down=2_000_000, agg_noise=noise, init_noise=0.0)
            if similarity:
                entry["module_similarity"] = {"within": 0.1 * r, "cross": 0.01, "pairs_within": 1, "pairs_cross": 2}
        out.append(entry)
    return out


def _run_dir(tmp_path: Path, name: str, method: str, metrics: list[dict]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    cfg = build_config({"lora": {"ranks": [2, 1]}, "federation": {"method": method, "num_clients": 2}}, [])
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


def test_series_and_bytes_skip_missing_values():
    run = _metrics("fedit", [3.0, 2.5, 2.0], noise=None)
    run[1]["eval"]["global"]["loss"] = float("nan")
    assert series(run, lambda e: e["round"], lambda e: e["eval"]["global"]["loss"]) == ([0.0, 2.0], [3.0, 2.0])
    assert cumulative_mb(run) == {0: 0.0, 1: 3.0, 2: 7.0}
    assert series(run, lambda e: e["round"], lambda e: e.get("agg_noise")) == ([], [])


def test_plots_from_plain_metrics_lists(tmp_path):
    runs = [_metrics("flora", [3.0, 2.0], noise=0.0), _metrics("fedit", [3.0, 2.2], noise=0.05)]
    path = plot_global(runs, ["flora", "fedit"], tmp_path / "g.png")
    assert path.read_bytes().startswith(PNG)
    assert plot_noise(runs, ["flora", "fedit"], tmp_path / "n.png").read_bytes().startswith(PNG)
    assert plot_similarity(runs, ["flora", "fedit"], tmp_path / "s.png") is None  # no fedplora run
    assert not (tmp_path / "s.png").exists()


def test_report_of_two_runs_overlays_them(tmp_path, capsys):
    a = _run_dir(tmp_path, "a-fedplora", "fedplora", _metrics("fedplora", [3.0, 2.5, 2.25], noise=0.0, similarity=True))
    b = _run_dir(tmp_path, "b-fedit", "fedit", _metrics("fedit", [3.0, 2.75], noise=0.125))
    assert main(["report", str(a), str(b)]) == 0
    md = (a / "report.md").read_text()
    assert "| a-fedplora | fedplora | 2 | 3.0000 → 2.2500 |" in md
    assert "| b-fedit | fedit | 1 | 3.0000 → 2.7500 | — | 1.0 | 2.0 | 0.1250 | 0.0000 |" in md
    assert "| 1 | 1 | 2.0000 | 1.2500 | -0.7500 |" in md  # client 1 of run a: rank 1, loss − 1
    # the config says 3 rounds: both stopped early, and the report says so with the way on
    assert "**Interrupted after round 2 of 3**" in md and f"`fedlora run --resume {a}` continues it." in md
    assert "**Interrupted after round 1 of 3**" in md
    for name in ("global", "clients", "noise", "similarity"):
        assert (a / f"report-{name}.png").read_bytes().startswith(PNG)
        assert f"(report-{name}.png)" in md


def test_report_of_a_folder_that_is_no_run_fails_in_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "RUN_DIR" in err and "config.yaml" in err and "Traceback" not in err


@pytest.mark.parametrize("line", ["not json"])
def test_bad_metrics_line_is_named(tmp_path, capsys, line):
    folder = _run_dir(tmp_path, "r", "fedit", _metrics("fedit", [3.0], noise=None))
    (folder / "metrics.jsonl").write_text(line + "\n")
    assert main(["report", str(folder)]) == 2
    assert "metrics.jsonl line 1" in capsys.readouterr().err


def test_the_closing_table_says_how_many_test_examples_each_loss_is_on():
    from rich.console import Console

    from fedlora.report.table import summary_table

    summary = {"method": "flora", "rounds": 2, "client_loss": {"0": {"before": 3.0, "after": 2.5}, "1": {"before": 3.1, "after": 2.9}},
               "global_loss": {"before": 3.0, "after": 2.6}, "bytes_up": 1e6, "bytes_down": 2e6, "agg_noise_mean": 0.0,
               "init_noise_mean": 0.0, "padded_fraction": 0.04, "wall_s": 12.0, "peak_rss_mb": 2048.0}
    partition = {"global_test": 24, "global_held_out": 231, "clients": [{"id": 0, "test": 12}, {"id": 1, "test": 7}]}
    console = Console(width=200, record=True)
    console.print(summary_table(summary, [4, 2], partition))
    text = console.export_text()
    assert "test examples" in text and "24 of 231" in text and "eval.max_examples" in text
    assert any(" 12 " in line and "3.0000" in line for line in text.splitlines())


def test_a_dp_runs_summary_and_closing_table_say_the_epsilon_spent_by_its_last_round():
    """Client-level DP: summary.json holds the accountant's ε after the last round (cumulative), and the closing table says it."""
    from rich.console import Console

    from fedlora.app.run_dir import summarize
    from fedlora.report.table import summary_table

    def line(rnd, eps=None):
        entry = {"round": rnd, "method": "fedit", "eval": {"global": {"loss": 3.0 - rnd / 10}, "clients": {"0": {"loss": 3.0}}}}
        if rnd:
            entry.update({"clients": [{"id": 0, "padded_fraction": 0.0}], "bytes_up": 10, "bytes_down": 10, "agg_noise": 0.1, "init_noise": 0.0})
        if eps is not None:
            entry["privacy"] = {"epsilon": eps, "delta": 1e-5, "noise_multiplier": 1.1, "clip": 0.5}
        return entry

    summary = summarize([line(0), line(1, 1.25), line(2, 2.5), line(3, 3.75)], 1.0)
    assert summary["privacy"] == {"epsilon": 3.75, "delta": 1e-5, "noise_multiplier": 1.1, "clip": 0.5, "rounds": 3}
    console = Console(width=200, record=True)
    console.print(summary_table(summary, [2], None))
    assert "client-level DP: (ε = 3.75, δ = 1e-05) after 3 rounds · σ = 1.1 · C = 0.5" in " ".join(console.export_text().split())  # wrapped to the table
    assert "privacy" not in summarize([line(0), line(1)], 1.0)  # no DP, no claim


def test_the_compare_table_shows_the_epsilon_spent_only_where_a_run_had_client_dp(tmp_path):
    from fedlora.report.compare_table import table_rows, write_markdown

    def record(method, eps):
        summary = {"global_loss": {"before": 3.0, "after": 2.5}, "bytes_up": 1e6, "bytes_down": 1e6, "agg_noise_mean": 0.1,
                   "init_noise_mean": 0.0, "ranks": [2, 2]}
        if eps is not None:
            summary["privacy"] = {"epsilon": eps, "delta": 1e-5, "noise_multiplier": 1.0, "clip": 0.5, "rounds": 2}
        return {"method": method, "summary": summary, "metrics": [{"round": 0}, {"round": 1, "wall_s": 1.0}, {"round": 2, "wall_s": 1.0}]}

    dp = table_rows([record("fedit", 4.0), record("fedit", 5.0)])
    assert dp[0]["epsilon"][0] == pytest.approx(4.5)
    text = write_markdown(dp, tmp_path / "dp.md").read_text()
    assert "ε spent (client DP)" in text and "4.50 ± 0.71" in text
    assert "ε spent" not in write_markdown(table_rows([record("fedit", None)]), tmp_path / "plain.md").read_text()
