"""What a reader sees: legends beside crowded panels, runs on equal values told apart, readable MB ticks."""

from __future__ import annotations

import matplotlib.figure

from fedlora.report import plots
from fedlora.report.compare_plots import plot_compare


def _captured(monkeypatch) -> list:
    figures: list = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    return figures


def _run(clients: int, noise: float = 0.0) -> list[dict]:
    return [{"round": r, "bytes_up": 3e6 * r, "bytes_down": 3e6 * r, "agg_noise": noise, "init_noise": 0.0,
             "eval": {"global": {"loss": 3.0 - 0.1 * r}, "clients": {str(k): {"loss": 3.0 - 0.01 * k * r} for k in range(clients)}}}
            for r in range(4)]


def test_ten_clients_legend_stands_beside_the_panel_not_on_the_curves(tmp_path, monkeypatch):
    figures = _captured(monkeypatch)
    assert plots.plot_clients([_run(10)], ["flora"], tmp_path / "c.png")
    fig = figures[0]
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # wholly right of the axes


def test_runs_on_the_same_noise_are_drawn_with_different_markers_and_dashes(tmp_path, monkeypatch):
    figures = _captured(monkeypatch)
    assert plots.plot_noise([_run(2), _run(2), _run(2)], ["flora", "fedit", "zeropad"], tmp_path / "n.png")
    lines = figures[0].axes[0].get_lines()
    assert len({(ln.get_marker(), ln.get_linestyle(), ln.get_markersize()) for ln in lines}) == 3


def test_compare_mb_axis_is_log_with_labelled_ticks_between_decades(tmp_path, monkeypatch):
    figures = _captured(monkeypatch)
    assert plot_compare({"flora": [_run(2), _run(2)], "fedit": [_run(2)]}, tmp_path / "loss.png")
    by_round, by_mb = figures[0].axes
    assert by_mb.get_xscale() == "log"
    figures[0].canvas.draw()
    labels = [t.get_text() for t in by_mb.get_xticklabels() if t.get_text()]
    assert {"10", "20"} <= set(labels), labels  # 6, 12, 18 MB: ticks at 1-2-5, not only at powers of ten
    from matplotlib.collections import LineCollection

    assert by_round.collections and all(type(c) is LineCollection for c in by_round.collections)  # ±std as bars, no bands that drown the lines
