"""`fedlora study STUDY.yaml`: plan, run (or resume) the cells, then write the tables and plots."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedlora.config import ConfigError
from fedlora.study.runner import estimate, run_study, slots, state
from fedlora.study.spec import Study, load_study

log = logging.getLogger("fedlora")


def output_of(study: Study, given: str | None) -> Path:
    """The study's folder: ``--output``, or beside the study file, named after it (so its records sit next to its spec)."""
    return Path(given) if given else study.path.parent / study.name


def study_command(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ConfigError(f"--jobs: invalid value {args.jobs} (accepted: an integer >= 1)")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: invalid value {args.threads} (accepted: an integer >= 1)")
    study = load_study(args.study)
    out = output_of(study, args.output)
    if args.dry_run:
        dry_run(study, out, args.jobs, args.threads)
        return 0
    if args.tables_only:
        if not (out / "runs").is_dir():
            raise ConfigError(f"--tables-only: no runs in {out} (accepted: a study whose cells have run, or --output DIR of one)")
    else:
        lines = run_study(study, out, args.jobs, args.threads, args.ray, args.only)
        if failed := [x["cell"] for x in lines if x["exit"] != 0]:
            log.warning("study %s: %d cells failed (%s); their logs are in %s", study.name, len(failed), ", ".join(failed), out / "logs")
    from fedlora.study.report import write_report

    for path in write_report(study, out):
        log.info("wrote %s", path)
    summary = out / "summary.md"
    if summary.is_file():
        Console().print(summary.read_text(), markup=False, highlight=False, soft_wrap=True)
    return 0


def dry_run(study: Study, out: Path, jobs: int, threads: int | None) -> None:
    """The cells, their state and overrides, and what the rest should cost at ``jobs`` at a time."""
    cells = study.cells()
    states = {c.name: state(study, c, out) for c in cells}
    log.info("timing a first round of each unfinished setting with no recorded round (one process each) …")
    cost = estimate(study, out, slots(jobs, threads)[0])
    table = Table(title=f"study {study.name}: {len(cells)} cells, {sum(s == 'done' for s in states.values())} done → {out}")
    for col in ("cell", "state", "overrides", "estimate"):
        table.add_column(col)
    for c in cells:
        est = cost.get(c.name)
        shown = f"{est['seconds'] / 60:.0f} min ({est['how']}: {est['round_s']:.1f} s/round)" if est else "—"
        table.add_row(c.name, states[c.name], " ".join(o for o in c.overrides), shown)
    console = Console()
    console.print(table)
    total = sum(e["seconds"] for e in cost.values())
    console.print(f"left: {len(cost)} cells, about {total / 3600:.1f} h of one slot's time; {jobs} at a time: about {total / 3600 / jobs:.1f} h "
                  f"(slots of {slots(jobs, threads)[0].threads} threads; times from a quiet machine scale with its load)")
