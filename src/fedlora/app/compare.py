"""`fedlora compare`: several methods over several seeds on the same partitions, one folder of results.

Per seed the experiment is prepared once (data, partition, model load); every method then runs on
that same split and model, from the same initial head, each into its own run folder
``<out>/runs/<method>-seed<s>/`` (config, partition, metrics, summary). A method that needs one
rank for every client (fedit, ffa, fedsa, fedex, rolora) runs at ``one_rank`` (default: the smallest client rank, which
every client can afford), and the table says so. A run whose summary.json exists is not repeated,
so an interrupted comparison resumes where it stopped; a run scored on another global test split
(an older comparison, `--vary-test-split` toggled) is run again rather than mixed in.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.config import Config, ConfigError, load_config
from fedlora.methods import REGISTRY, Method, MethodError, Setup, build_method
from fedlora.federation.experiment import Experiment, check_model, prepare
from fedlora.sim.federation import Hooks, Simulation
from fedlora.app.final import save_final
from fedlora.app.run_dir import RunDir, summarize, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What ``compare`` will run: the config file, the shared overrides, methods and seeds."""

    config: str
    overrides: list[str]
    methods: list[str]
    seeds: list[int]
    one_rank: int | None = None


def parse_methods(text: str) -> list[str]:
    """``a,b,c`` → registered method names, in order, without repeats."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ConfigError(f"--methods: empty value {text!r} (accepted: comma-separated names from {', '.join(REGISTRY)})")
    if bad := [m for m in names if m not in REGISTRY]:
        raise ConfigError(f"--methods: unknown value {bad[0]!r} (accepted: comma-separated names from {', '.join(REGISTRY)})")
    return list(dict.fromkeys(names))


def make_plan(config: str, methods: str, seeds: int, overrides: list[str], one_rank: int | None = None, vary_test: bool = False) -> Plan:
    """Validate everything before any work: the config with its overrides, the methods, the seeds.

    Unless ``vary_test``, every seed is scored on the first seed's global test split (``data.global_test_seed``),
    so the mean and band over seeds measure training, not which examples were held out.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds: invalid value {seeds} (accepted: an integer >= 1)")
    if one_rank is not None and one_rank < 1:
        raise ConfigError(f"--one-rank: invalid value {one_rank} (accepted: an integer >= 1)")
    base = load_config(config, overrides)
    if not vary_test and base.data.global_test_seed is None:
        overrides = [*overrides, f"data.global_test_seed={base.seed}"]
    return Plan(config, list(overrides), parse_methods(methods), [base.seed + i for i in range(seeds)], one_rank)


def method_config(plan: Plan, method: str, seed: int, shapes: dict[str, tuple[int, int]]) -> tuple[Config, Method, bool]:
    """The config and method object for one run; True when the method had to use one rank for all."""
    extra = [f"seed={seed}", f"federation.method={method}"]
    cfg = load_config(plan.config, [*plan.overrides, *extra])
    try:
        return cfg, build_method(method, _setup(cfg, shapes)), False
    except MethodError:
        if len(set(cfg.client_ranks())) == 1 and plan.one_rank is None:
            raise
    rank = plan.one_rank or min(cfg.client_ranks())
    cfg = load_config(plan.config, [*plan.overrides, *extra, f"lora.rank={rank}"])
    return cfg, build_method(method, _setup(cfg, shapes)), True


def _setup(cfg: Config, shapes: dict[str, tuple[int, int]]) -> Setup:
    return Setup(
        layers=shapes, ranks=dict(enumerate(cfg.client_ranks())), scales=dict(enumerate(cfg.client_scales())),
        seed=cfg.seed, options=cfg.federation.options, rank_patterns=cfg.client_rank_patterns(),
    )


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}-seed{seed}"


def done(plan: Plan, out: Path, seed: int) -> set[str]:
    """The plan's methods whose run of ``seed`` finished under ``out``, scored on the plan's global test split
    (a run of an older comparison in the same folder, on another split, is run again, not mixed in)."""
    want = load_config(plan.config, [*plan.overrides, f"seed={seed}"]).data.global_test_seed  # once per seed
    finished_methods = set()
    for method in plan.methods:
        folder = run_dir(out, method, seed)
        try:
            if (folder / "summary.json").is_file() and load_config(folder / "config.yaml", []).data.global_test_seed == want:
                finished_methods.add(method)
        except ConfigError:
            pass
    return finished_methods


def finished(plan: Plan, out: Path) -> list[dict[str, Any]]:
    """The records of the plan's runs that finished under ``out`` (nothing is run)."""
    records = []
    for seed in plan.seeds:
        ran = done(plan, out, seed)
        records += [_record(run_dir(out, m, seed), m, seed) for m in plan.methods if m in ran]
    return records


def compare(plan: Plan, out: Path, hooks: Hooks | None = None) -> list[dict[str, Any]]:
    """Run every (method, seed) not yet finished under ``out``; return one record per run."""
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(plan.config, plan.overrides)
    _, shapes = check_model(base)
    for method in plan.methods:  # every method error before the first model load
        for seed in plan.seeds:
            method_config(plan, method, seed, shapes)
    write_json(out / "plan.json", dataclasses.asdict(plan))
    records = []
    for seed in plan.seeds:
        ran = done(plan, out, seed)
        todo = [m for m in plan.methods if m not in ran]
        exp = _prepare(plan, seed) if todo else None
        head0 = exp.host.initial_head() if exp else {}
        for method in plan.methods:
            folder = run_dir(out, method, seed)
            if method in todo:
                assert exp is not None
                _run_one(plan, exp, head0, method, seed, folder, hooks)
            records.append(_record(folder, method, seed))
    return records


def _prepare(plan: Plan, seed: int) -> Experiment:
    cfg = load_config(plan.config, [*plan.overrides, f"seed={seed}"])
    torch.manual_seed(seed)
    return prepare(cfg)


def _run_one(plan: Plan, exp: Experiment, head0: dict, method: str, seed: int, folder: Path, hooks: Hooks | None) -> None:
    """One method on the seed's prepared experiment: same split, same model, fresh method and head."""
    _, shapes = check_model(exp.cfg)
    cfg, obj, one_rank = method_config(plan, method, seed, shapes)
    if folder.exists():  # an unfinished earlier attempt: start it again
        for f in sorted(folder.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
    run = RunDir(folder)
    run.write_config(cfg)
    info = copy.deepcopy(exp.partition_info)
    for c, r in zip(info["clients"], cfg.client_ranks()):
        c["rank"] = r
    run.write_partition(info)
    exp.host.reset_base()  # the model as loaded: a merging method before this one left its base behind
    exp.host.set_head(head0)
    torch.manual_seed(seed)
    log.info("compare: %s, seed %d%s → %s", method, seed, f" (one rank {cfg.client_ranks()[0]})" if one_rank else "", folder)
    t0 = time.perf_counter()
    sim = Simulation(dataclasses.replace(exp, cfg=cfg, method=obj), hooks or Hooks())
    sim.run(run.record)
    if cfg.output.save_final:  # a compared run is a usable run: export and eval read its final/
        save_final(sim.server, folder / "final")
    summary = summarize(run.read_metrics(), time.perf_counter() - t0)
    summary["one_rank"] = cfg.client_ranks()[0] if one_rank else None
    summary["ranks"] = cfg.client_ranks()
    run.write_summary(summary)


def _record(folder: Path, method: str, seed: int) -> dict[str, Any]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    summary = json.loads((folder / "summary.json").read_text())
    return {"method": method, "seed": seed, "summary": summary, "metrics": [json.loads(x) for x in lines if x.strip()]}


def write_outputs(records: list[dict[str, Any]], out: Path, caption: str = "") -> list[Path]:
    """table.md, table.csv and one PNG per global metric (loss; accuracy when the task has it)."""
    from fedlora.report.compare_plots import plot_compare
    from fedlora.report.compare_table import table_rows, write_csv, write_markdown

    rows = table_rows(records)
    paths = [write_markdown(rows, out / "table.md", caption), write_csv(rows, out / "table.csv")]
    by_method: dict[str, list] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r["metrics"])
    for metric in ("loss", "accuracy"):
        if png := plot_compare(by_method, out / f"{metric}.png", metric, title=out.name):
            paths.append(png)
    return paths


def machine_line() -> str:
    """Where the figures were measured (wall times on a shared machine compare only within one run)."""
    import os
    import platform

    cpu = platform.processor() or "unknown CPU"
    info = Path("/proc/cpuinfo")
    if info.is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")), cpu)
    return f"{platform.machine()} {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def logging_hooks() -> Hooks:
    """One log line per finished round (the run folders hold the numbers)."""

    def round_end(entry: dict[str, Any]) -> None:
        g = (entry.get("eval") or {}).get("global") or {}
        shown = " · ".join(f"{k} {v:.4f}" for k, v in g.items() if isinstance(v, (int, float)))
        log.info("  %s round %d%s (%.1f s)", entry["method"], entry["round"], f": {shown}" if shown else "", entry.get("wall_s", 0.0))

    return Hooks(round_end=round_end)


def cli(
    config: str | None, methods: str, seeds: int, overrides: list[str], output: str | None, one_rank: int | None, argv: list[str],
    tables_only: bool = False, vary_test: bool = False,
) -> Path:
    """`fedlora compare`: validate, run what is missing, write table.md, table.csv and the PNGs; returns the folder."""
    from datetime import datetime

    from fedlora.config import packaged_config

    plan = make_plan(config or str(packaged_config("default")), methods, seeds, overrides, one_rank, vary_test)
    out = Path(output) if output else Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-compare"
    if tables_only and not (out / "runs").is_dir():
        raise ConfigError(f"--tables-only: no finished runs in {out} (accepted: the --output folder of an earlier compare)")
    records = finished(plan, out) if tables_only else compare(plan, out, logging_hooks())
    caption = f"`fedlora {' '.join(argv)}` · seeds {plan.seeds} · {machine_line()}"
    for path in write_outputs(records, out, caption):
        log.info("wrote %s", path)
    return out
