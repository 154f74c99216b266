"""`fedlora compare`: several methods over several seeds on the same partitions, one folder of results.

Per seed the experiment is prepared once (data, partition, model load); every method then runs on
that same split and model, from the same initial head, each into its own run folder
``<out>/runs/<method>-seed<s>/`` (config, partition, metrics, summary). A method that declares one
rank for every client (``ranks = "one"``: fedit, ffa, fedsa, fedex, rolora) runs at ``one_rank`` (default: the smallest client rank, which
every client can afford), and the table says so.

A finished run is reused only when its resolved config equals the plan's: its summary.json holds
``config_digest``, the SHA-256 of the config's canonical JSON without ``output.*``
(``config_digest()``), and it must equal the digest of the config the plan would run. So an
interrupted comparison resumes where it stopped (one log line names the runs it reuses), while a
comparison of other settings into the same ``--output`` stops before any work with one line
naming the folder and a setting that differs, instead of passing the old numbers off as new.
compare deletes a folder only when it is its own unfinished run of the same settings (it marks
every run folder it creates with a ``.fedlora-compare`` file holding the digest); any other
folder in the way is one line, and is left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.config import Config, ConfigError, load_config
from fedlora.methods import Method, MethodError, Setup, available, build_method, method_class
from fedlora.methods.registry import needs_one_rank
from fedlora.federation.experiment import Experiment, check_model, prepare
from fedlora.sim.federation import Hooks, Simulation
from fedlora.app.final import save_final
from fedlora.app.run_dir import RunDir, _flat, summarize, write_json

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
    """``a,b,c`` → method names (registered, an entry point's, or package.module:Class), in order, without repeats."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ConfigError(f"--methods: empty value {text!r} (accepted: comma-separated names from {', '.join(available())})")
    for name in names:
        try:
            method_class(name)
        except MethodError as e:
            raise ConfigError(f"--methods: unknown value {name!r} (accepted: comma-separated names from {', '.join(available())}, or package.module:Class)") from e
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


def run_config(plan: Plan, method: str, seed: int) -> tuple[Config, bool]:
    """The config of one run; True when the method declares one rank (``ranks = "one"``) and the clients' differ."""
    extra = [f"seed={seed}", f"federation.method={method}"]
    cfg = load_config(plan.config, [*plan.overrides, *extra])
    if not needs_one_rank(method, cfg.client_ranks()):
        return cfg, False
    return load_config(plan.config, [*plan.overrides, *extra, f"lora.rank={plan.one_rank or min(cfg.client_ranks())}"]), True


def method_config(plan: Plan, method: str, seed: int, shapes: dict[str, tuple[int, int]]) -> tuple[Config, Method, bool]:
    """The config and method object for one run (``run_config``), the method built on the real layers."""
    cfg, one_rank = run_config(plan, method, seed)
    return cfg, build_method(method, _setup(cfg, shapes)), one_rank


def _setup(cfg: Config, shapes: dict[str, tuple[int, int]]) -> Setup:
    return Setup(
        layers=shapes, ranks=dict(enumerate(cfg.client_ranks())), scales=dict(enumerate(cfg.client_scales())),
        seed=cfg.seed, options=cfg.federation.options, rank_patterns=cfg.client_rank_patterns(),
    )


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}-seed{seed}"


MARK = ".fedlora-compare"
"""Written into every run folder compare creates, before anything else; holds the run's config digest."""

DIGEST = "config_digest"
"""The summary.json key of the run's config digest."""


def config_digest(cfg: Config) -> str:
    """SHA-256 of the resolved config's canonical JSON (sorted keys, no spaces), ``output.*`` left out:
    the settings that decide a run's numbers, not where it writes them."""
    data = cfg.model_dump(mode="json")
    data.pop("output", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class Slot:
    """One (method, seed) of the plan: its folder, its config and what is in its folder now.

    ``state``: ``new`` (no folder, or an empty one), ``reuse`` (a finished run of the same config),
    ``redo`` (compare's own unfinished run of the same config: deleted and run again).
    """

    method: str
    seed: int
    folder: Path
    cfg: Config
    one_rank: bool
    digest: str
    state: str


def slots(plan: Plan, out: Path, shapes: dict[str, tuple[int, int]] | None, finished_only: bool = False) -> list[Slot]:
    """Every (method, seed) of the plan, seed by seed, with the state of its folder under ``out``.

    A folder that is neither a finished run of the plan's config nor compare's own unfinished run
    of it is a ConfigError of one line (nothing is deleted); with ``finished_only`` (tables only:
    nothing runs) an unfinished or foreign folder is skipped, a finished run of other settings is
    still an error. ``shapes`` None (tables only, the model folder absent): the config alone, the
    method not built (whether it runs at one rank is declared, ``run_config``). Reads the folders
    only: call it before any work.
    """
    out_slots = []
    for seed in plan.seeds:
        for method in plan.methods:
            if shapes is not None:
                cfg, _, one_rank = method_config(plan, method, seed, shapes)
                choices = [(cfg, one_rank)]
            else:
                choices = [run_config(plan, method, seed)]
            folder = run_dir(out, method, seed)
            found = _state(folder, choices, finished_only)
            if found is not None:
                state, (cfg, one_rank) = found
                out_slots.append(Slot(method, seed, folder, cfg, one_rank, config_digest(cfg), state))
    return out_slots


def _state(folder: Path, choices: list[tuple[Config, bool]], finished_only: bool) -> tuple[str, tuple[Config, bool]] | None:
    """What is at ``folder`` for a run of one of ``choices`` (config, one rank): new, reuse (with the one it matches) or redo."""
    accepted = f"(accepted: move {folder} away, or another --output)"
    cfg = choices[0][0]
    if not folder.exists() and not folder.is_symlink():
        return None if finished_only else ("new", choices[0])
    if not folder.is_dir():
        raise ConfigError(f"--output: {folder} is in the way: not a run folder {accepted}")
    if (folder / "summary.json").is_file():
        theirs = _summary_digest(folder)
        for choice in choices:
            if theirs == config_digest(choice[0]):
                return "reuse", choice
        why = "its summary.json holds no readable config digest" if theirs is None else "its summary.json's config digest is not this comparison's"
        raise ConfigError(f"--output: {folder} holds a finished run of other settings: {_difference(folder, cfg, why)} {accepted}")
    if finished_only:
        return None
    if not any(folder.iterdir()):
        return "new", choices[0]
    mark = folder / MARK
    if not mark.is_file():
        raise ConfigError(f"--output: {folder} is in the way: it holds files compare did not write, and no finished run {accepted}")
    if mark.read_text(encoding="utf-8", errors="replace").strip() != config_digest(cfg):
        why = f"its {MARK} names another config digest"
        raise ConfigError(f"--output: {folder} holds an unfinished compare run of other settings: {_difference(folder, cfg, why)} {accepted}")
    return "redo", choices[0]


def _summary_digest(folder: Path) -> str | None:
    """The digest a finished run recorded; for a run of a fedlora that recorded none, its config.yaml's; None if neither reads."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(summary, dict) and DIGEST in summary:
        return summary[DIGEST] if isinstance(summary[DIGEST], str) else None
    try:
        return config_digest(load_config(folder / "config.yaml", []))
    except ConfigError:
        return None


def _difference(folder: Path, cfg: Config, otherwise: str) -> str:
    """One setting on which the run in ``folder`` (its config.yaml) differs from ``cfg``, as words; ``otherwise`` when none does."""
    try:
        saved = load_config(folder / "config.yaml", [])
    except ConfigError:
        return "its config.yaml is missing or not a fedlora config"
    old, new = _flat(saved.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    for key in sorted(set(old) | set(new)):
        if not key.startswith("output.") and old.get(key) != new.get(key):
            return f"{key}={old.get(key)!r} there, {new.get(key)!r} in this comparison"
    return otherwise


def finished(plan: Plan, out: Path) -> list[dict[str, Any]]:
    """The records of the plan's runs that finished under ``out`` with the plan's config (nothing is run)."""
    try:
        _, shapes = check_model(load_config(plan.config, plan.overrides))
    except ConfigError:  # tables from results alone: the model folder need not be here
        shapes = None
    ready = slots(plan, out, shapes, finished_only=True)
    _log_reused([s for s in ready if s.state == "reuse"])
    return [_record(s.folder, s.method, s.seed) for s in ready]


def compare(plan: Plan, out: Path, hooks: Hooks | None = None) -> list[dict[str, Any]]:
    """Run every (method, seed) not yet finished under ``out``; return one record per run.

    Every method error and every folder in the way is found before the first model load and before
    anything is written; the finished runs of the plan's config are reused (one log line names them).
    """
    base = load_config(plan.config, plan.overrides)
    _, shapes = check_model(base)
    todo = slots(plan, out, shapes)  # every method error and every folder in the way, before the first model load
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", dataclasses.asdict(plan))
    _log_reused([s for s in todo if s.state == "reuse"])
    records = []
    for seed in plan.seeds:
        here = [s for s in todo if s.seed == seed]
        run = [s for s in here if s.state != "reuse"]
        exp = _prepare(plan, seed) if run else None
        head0 = exp.host.initial_head() if exp else {}
        zero: dict[str, Any] | None = None  # round 0 of this seed: the same untrained model for every method with a global one
        for slot in here:
            if slot.state != "reuse":
                assert exp is not None
                zero = _run_one(exp, head0, slot, hooks, zero)
            records.append(_record(slot.folder, slot.method, slot.seed))
    return records


def _log_reused(reused: list[Slot]) -> None:
    if reused:
        log.info("compare: reusing %d finished run%s of the same settings: %s", len(reused), "" if len(reused) == 1 else "s",
                 ", ".join(str(s.folder) for s in reused))


def _prepare(plan: Plan, seed: int) -> Experiment:
    cfg = load_config(plan.config, [*plan.overrides, f"seed={seed}"])
    torch.manual_seed(seed)
    return prepare(cfg)


def _run_one(exp: Experiment, head0: dict, slot: Slot, hooks: Hooks | None, zero: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """One method on the seed's prepared experiment: same split, same model, fresh method and head.

    Every fresh adapter starts at ΔW = 0 (B = 0) from the same head, so round 0's evaluation is the
    same for every method with a global model: it is taken once per seed (``zero``) and recorded
    under each such method, not evaluated again. Returns the round 0 to share.
    """
    _, shapes = check_model(exp.cfg)
    cfg, folder, one_rank = slot.cfg, slot.folder, slot.one_rank
    obj = build_method(slot.method, _setup(cfg, shapes))
    if slot.state == "redo":  # compare's own unfinished run of this config (its mark says so): start it again
        mark = folder / MARK
        assert mark.is_file() and mark.read_text(encoding="utf-8").strip() == slot.digest and not (folder / "summary.json").exists(), folder
        shutil.rmtree(folder)
    run = RunDir(folder)
    (folder / MARK).write_text(slot.digest + "\n", encoding="utf-8")  # first: whatever follows is compare's to delete
    run.write_config(cfg)
    info = copy.deepcopy(exp.partition_info)
    for c, r in zip(info["clients"], cfg.client_ranks()):
        c["rank"] = r
    run.write_partition(info)
    exp.host.reset_base()  # the model as loaded: a merging method before this one left its base behind
    exp.host.set_head(head0)
    torch.manual_seed(slot.seed)
    log.info("compare: %s, seed %d%s → %s", slot.method, slot.seed, f" (one rank {cfg.client_ranks()[0]})" if one_rank else "", folder)
    t0 = time.perf_counter()
    sim = Simulation(dataclasses.replace(exp, cfg=cfg, method=obj), hooks or Hooks())
    shares = obj.kind == "global" and not obj.keeps
    if shares and zero is not None:
        run.record({**zero, "method": slot.method})
        sim.run(run.record, done=[zero])
    else:
        sim.run(run.record)
        if shares:
            zero = run.read_metrics()[0]
    if cfg.output.save_final:  # a compared run is a usable run: export and eval read its final/
        save_final(sim.server, folder / "final")
    summary = summarize(run.read_metrics(), time.perf_counter() - t0)
    summary["one_rank"] = cfg.client_ranks()[0] if one_rank else None
    summary["ranks"] = cfg.client_ranks()
    summary[DIGEST] = slot.digest
    run.write_summary(summary)
    return zero


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
