"""The closing table of a run: loss before/after per client and globally, megabytes sent."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def round_line(entry: dict[str, Any]) -> str:
    """``round 3 done · global loss 2.2462``: the one line a finished round gets in a log."""
    loss = (entry.get("eval") or {}).get("global", {}).get("loss")
    return f"round {entry['round']} done" + (f" · global loss {loss:.4f}" if loss is not None else "")


def privacy_line(p: dict[str, Any]) -> str:
    """``client-level DP: (ε = 4.21, δ = 1e-05) after 20 rounds · σ = 1.1 · C = 0.5``: what the run spent."""
    return (f"client-level DP: (ε = {p['epsilon']:.3g}, δ = {p['delta']:g}) after {p['rounds']} rounds · "
            f"σ = {p['noise_multiplier']:.4g} · C = {p['clip']:g}")


def summary_table(summary: dict[str, Any], ranks: list[int], partition: dict[str, Any] | None = None) -> Table:
    """The closing table; with ``partition`` (partition.json) it says how many test examples each loss is on."""
    table = Table(title=f"fedlora · {summary['method']} · {summary['rounds']} rounds", show_lines=False)
    counts = {str(c["id"]): str(c["test"]) for c in (partition or {}).get("clients", [])}
    for col in ("client", "rank", "test examples", "loss before", "loss after", "Δ"):
        table.add_column(col, justify="right")
    for k, v in summary["client_loss"].items():
        b, a = v["before"], v["after"]
        table.add_row(k, str(ranks[int(k)]), counts.get(k, "?"), _fmt(b), _fmt(a), _fmt(None if b is None or a is None else a - b))
    g = summary["global_loss"]
    held = f"{partition['global_test']} of {partition.get('global_held_out', partition['global_test'])}" if partition else "?"
    table.add_row("global", "", held, _fmt(g["before"]), _fmt(g["after"]), _fmt(None if g["before"] is None or g["after"] is None else g["after"] - g["before"]), style="bold")
    if acc := summary.get("global_accuracy"):
        table.add_row("accuracy", "", "", _fmt(acc["before"]), _fmt(acc["after"]), _fmt(None if None in acc.values() else acc["after"] - acc["before"]))
    mb_up, mb_down = summary["bytes_up"] / 1e6, summary["bytes_down"] / 1e6
    noise = f"agg_noise {_fmt(summary['agg_noise_mean'])} · init_noise {_fmt(summary['init_noise_mean'])}"
    table.caption = (
        f"sent up {mb_up:.1f} MB · down {mb_down:.1f} MB · {noise} · padded {100 * (summary['padded_fraction'] or 0):.1f}% · "
        f"{summary['wall_s']:.0f} s · peak RSS {summary['peak_rss_mb'] / 1024:.1f} GiB"
        + (" · test examples capped by eval.max_examples" if partition else "")
        + (f"\n{privacy_line(p)}" if (p := summary.get("privacy")) else "")
    )
    return table
