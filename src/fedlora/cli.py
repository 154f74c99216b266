"""`fedlora run | simulate | compare | data | methods | deploy | report | export | eval | config`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from rich.console import Console  # noqa: E402
from rich.logging import RichHandler  # noqa: E402
from rich.markup import escape  # noqa: E402

from fedlora.config import ConfigError, load_config, packaged_config  # noqa: E402
from fedlora.app.run_dir import resume_config  # noqa: E402

console = Console(stderr=True)
log = logging.getLogger("fedlora")

SETTINGS = "Every setting, its type, default and bounds: docs/config.md, or `fedlora config --reference`."

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileExistsError)


class Interrupted(Exception):
    """Ctrl-C during a command: one line saying what was kept and how to continue."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from fedlora.data import DataError
    from fedlora.methods import MethodError
    from fedlora.evaluation.runs import RunFolderError
    from fedlora.model.assets import AssetError
    from fedlora.federation.round import RoundFailed
    from fedlora.app.checkpoint import CheckpointError

    return (*USER_ERRORS, DataError, MethodError, AssetError, RunFolderError, RoundFailed, CheckpointError)


def cmd_run(args: argparse.Namespace) -> int:
    from fedlora.app.preflight import preflight

    config_path = args.config or packaged_config("default")
    cfg = resume_config(Path(args.resume), args.config, args.overrides) if args.resume else load_config(config_path, args.overrides)
    preflight(cfg)  # method errors in a second, before transformers, the data and the model load
    import torch

    from fedlora.report.table import summary_table
    from fedlora.federation.experiment import prepare
    from fedlora.sim.federation import Simulation
    from fedlora.app.progress import rich_hooks
    from fedlora.app.checkpoint import run_with_checkpoints
    from fedlora.app.final import save_final
    from fedlora.app.run_dir import RunDir, default_run_dir, finished, lock, summarize
    from fedlora.app.trackers import Trackers
    if args.resume:
        held = lock(Path(args.resume))  # noqa: F841 - until this process ends
        if finished(Path(args.resume), cfg.federation.rounds):
            log.info("%s is finished (round %d of %d): nothing to resume, nothing changed", args.resume, cfg.federation.rounds, cfg.federation.rounds)
            return 0
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    exp = prepare(cfg)
    if args.resume:
        run = RunDir(Path(args.resume), resume=True)
    else:
        run = RunDir(Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg.federation.method))
        held = lock(run.path)  # noqa: F841
        run.write_config(cfg)
        run.write_partition(exp.partition_info)
    log.info("run folder: %s", run.path)
    trackers = Trackers(cfg.output.trackers, run.path, cfg)
    run.listeners.append(trackers)
    try:
        with rich_hooks(console, cfg) as hooks:
            sim = Simulation(exp, hooks)
            run_with_checkpoints(sim, run, resume_run=bool(args.resume))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {run.path} keeps every finished round; `fedlora run --resume {run.path}` continues from the last") from None
    finally:
        trackers.close()
    if cfg.output.save_final:
        save_final(sim.server, run.path / "final")
    summary = summarize(run.read_metrics(), time.perf_counter() - t0)
    summary["run_dir"] = str(run.path)
    run.write_summary(summary)
    Console().print(summary_table(summary, cfg.client_ranks(), json.loads((run.path / "partition.json").read_text())))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """The config as a run would resolve it, as YAML; or the reference of every setting."""
    from fedlora.config import to_yaml

    if args.reference:
        from fedlora.config_reference import reference_markdown

        print(reference_markdown(), end="")
        return 0
    print(to_yaml(load_config(args.config or packaged_config("default"), args.overrides)), end="")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Every method this install can run: the package's and each installed entry point's, with what it declares."""
    from rich.table import Table

    from fedlora.methods import available

    table = Table(title="fedlora methods (federation.method=NAME, options as federation.options.KEY=VALUE)", show_lines=True)
    for col in ("method", "what it does", "declares", "options"):
        table.add_column(col)
    for name, cls in available().items():
        opts = "\n".join(f"{k} = {o.default!r} ({o.accepted()}): {o.help}" for k, o in cls.options.items()) or "—"
        flags = [f for f in ("exact", "merges", "sums_only") if getattr(cls, f)]
        where = "" if cls.__module__.startswith("fedlora.") else f"\nfrom {cls.__module__}"
        table.add_row(name, cls.summary + where, f"ranks: {cls.ranks}\n{cls.kind}" + "".join(f"\n{f}" for f in flags), opts)
    Console().print(table)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Several methods × seeds on the same partitions: table.md, table.csv and PNGs in one folder."""
    from fedlora.app.compare import cli

    out = cli(args.config, args.methods, args.seeds, args.overrides, args.output, args.one_rank, sys.argv[1:], args.tables_only, args.vary_test_split)
    Console().print((out / "table.md").read_text(), markup=False, highlight=False, soft_wrap=True)  # the table it wrote
    log.info("comparison in %s", out)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from fedlora.study.cli import study_command

    return study_command(args)


def cmd_data(args: argparse.Namespace) -> int:
    """Partition the config's source as a run would, print the per-client table, write a heatmap."""
    from fedlora.report.partition import partition_heatmap, partition_table
    from fedlora.federation.experiment import load_source, split_indices
    from fedlora.app.run_dir import default_run_dir, holds_run, write_json

    cfg = load_config(args.config or packaged_config("default"), args.overrides)
    out = Path(cfg.output.dir) if cfg.output.dir else default_run_dir("data")
    if holds_run(out):
        raise FileExistsError(f"output.dir: {out} holds a run (config.yaml or metrics.jsonl) (accepted: a new folder, or one `fedlora data` wrote)")
    examples = load_source(cfg)
    categories = [e.category for e in examples]
    info = split_indices(cfg, categories)
    parts = [c["all_indices"] for c in info["clients"]]
    d = cfg.data
    title = f"{d.source} · {d.partition}" + (f" α={d.alpha}" if d.partition in ("dirichlet", "quantity") else "") + f" · {len(parts)} clients"
    Console().print(partition_table(parts, categories, title=title))
    out.mkdir(parents=True, exist_ok=True)
    png = partition_heatmap(parts, categories, out / "partition.png", title)
    for c in info["clients"]:
        del c["all_indices"]
    write_json(out / "partition.json", info)
    scored = "" if info["global_test"] == info.get("global_held_out", info["global_test"]) else f", {info['global_test']} of them scored (eval.max_examples)"
    log.info("heatmap %s · partition.json in %s (global test split: %d examples held out%s)", png, out, info.get("global_held_out", info["global_test"]), scored)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """The config on a local Flower deployment: a SuperLink and one SuperNode per client on 127.0.0.1."""
    try:
        from fedlora.flower.launch import main as launch
    except ImportError:
        console.print("[bold red]error:[/] " + escape("fedlora deploy needs Flower (accepted: pip install -e \".[flower]\" in the fedlora checkout)"))
        return 2
    argv = _launcher_argv(args) + [f for f, on in (("--tls", args.tls), ("--auth", args.auth)) if on]
    for rank in args.node_rank:
        argv += ["--node-rank", rank]
    return launch([*argv, *args.overrides])


def _launcher_argv(args: argparse.Namespace) -> list[str]:
    """The flags `deploy` and `simulate` share, as fedlora.flower.launch takes them."""
    argv = ["--config", args.config] if args.config else []
    for flag in ("output", "workdir", "resume"):
        if getattr(args, flag) is not None:  # --resume "" is refused by the launcher, never taken for a new run
            argv += [f"--{flag}", getattr(args, flag)]
    return argv


def cmd_simulate(args: argparse.Namespace) -> int:
    """The config on Flower's simulation runtime: the same ServerApp and ClientApp, virtual nodes in Ray actors."""
    if args.backend == "inprocess":
        if args.output and not args.resume:
            args.overrides.append(f"output.dir={args.output}")
        return cmd_run(args)
    try:
        from fedlora.flower.launch import main as launch
    except ImportError:
        console.print("[bold red]error:[/] " + escape("fedlora simulate --backend ray needs Flower and Ray (accepted: pip install -e \".[simulation]\" in the fedlora checkout)"))
        return 2
    argv = ["--simulation", "--client-cpus", str(args.client_cpus), *_launcher_argv(args)]
    if args.client_gpus is not None:
        argv += ["--client-gpus", str(args.client_gpus)]
    return launch([*argv, *args.overrides])


def cmd_report(args: argparse.Namespace) -> int:
    """report.md and report-*.png of one or more runs, overlaid (docs/use.md)."""
    from fedlora.report.markdown import write_report

    log.info("report %s", write_report(args.run_dirs, args.out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The run's global model as a PEFT adapter (or a merged model folder), docs/use.md."""
    from fedlora.evaluation.export_run import describe, export_run

    Console().print(describe(export_run(args.run_dir, args.out, args.rank, args.merged, args.client)), highlight=False, soft_wrap=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Held-out loss/perplexity or multiple-choice accuracy, and greedy generations (docs/use.md)."""
    from fedlora.evaluation.eval_run import describe, run_eval
    from fedlora.app.run_dir import write_json

    if args.lm_eval:
        from fedlora.evaluation.lm_eval_task import describe as lm_describe, run_lm_eval

        result = run_lm_eval(args.path, args.lm_eval, limit=args.limit)
        Console().print("\n".join(lm_describe(result)), highlight=False, soft_wrap=True, markup=False)
        if args.json:
            write_json(Path(args.json), result)
        return 0
    result = run_eval(args.path, args.data, client=args.client, prompts=args.prompt, generate=args.generate, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                      base=args.base)
    Console().print("\n".join(describe(result)), highlight=False, soft_wrap=True, markup=False)
    if args.json:
        write_json(Path(args.json), result)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedlora")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning of LLMs with heterogeneous LoRA ranks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"fedlora {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment in one process", epilog=SETTINGS)
    run.add_argument("config", nargs="?", help="YAML config (default: the packaged default.yaml)")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. federation.rounds=5")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last complete round (same config)")
    run.set_defaults(func=cmd_run)
    simulate = sub.add_parser("simulate", help="run a config on Flower's simulation runtime (Ray: clients in parallel on CPUs/GPUs)", epilog=SETTINGS)
    simulate.add_argument("config", nargs="?", help="YAML config (default: the packaged default.yaml)")
    simulate.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. federation.rounds=5")
    simulate.add_argument("--backend", choices=["ray", "inprocess"], default="ray", help="ray: Flower's simulation runtime (default); inprocess: as `fedlora run`")
    simulate.add_argument("--client-cpus", type=float, default=1.0, help="ray: CPUs (and torch threads) per client, a whole number; as many clients run at once as fit (default 1)")
    simulate.add_argument("--client-gpus", type=float, default=None, help="ray: GPUs per client, 0.5 = two share one (default: 1 with CUDA, else 0)")
    simulate.add_argument("--output", help="run folder (default: output.dir, else runs/<time>-<method>-ray; inprocess: as output.dir)")
    simulate.add_argument("--workdir", help="ray: logs and the virtual nodes' state (default: .<run folder>.flower beside the run folder)")
    simulate.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest complete checkpoint (ray: the same --workdir)")
    simulate.set_defaults(func=cmd_simulate)
    data = sub.add_parser("data", help="show how a config deals its data to clients (table + heatmap PNG)")
    data.add_argument("config", nargs="?", help="YAML config (default: the packaged default.yaml)")
    data.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.alpha=0.1")
    data.set_defaults(func=cmd_data)
    conf = sub.add_parser("config", help="print a resolved config (or, with --reference, every setting)", epilog=SETTINGS)
    conf.add_argument("config", nargs="?", help="YAML config (default: the packaged default.yaml)")
    conf.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    conf.add_argument("--reference", action="store_true", help="every setting with type, default, bounds and meaning (docs/config.md)")
    conf.set_defaults(func=cmd_config)
    methods = sub.add_parser("methods", help="list the aggregation methods")
    methods.set_defaults(func=cmd_methods)
    compare = sub.add_parser("compare", help="run several methods over several seeds on the same partitions; table and plots")
    compare.add_argument("config", nargs="?", help="YAML config (default: the packaged default.yaml)")
    compare.add_argument("overrides", nargs="*", help="dotted key=value overrides shared by every run")
    compare.add_argument("--methods", required=True, help="comma-separated methods, e.g. flora,fedit,zeropad,fedplora")
    compare.add_argument("--seeds", type=int, default=3, help="seeds seed, seed+1, … (default 3)")
    compare.add_argument("--one-rank", type=int, default=None, help="rank for methods that need one rank for all (default: the smallest client rank)")
    compare.add_argument("--output", help="folder (default: runs/<time>-compare); a finished run in it is reused only when its resolved config equals this one")
    compare.add_argument("--tables-only", action="store_true", help="run nothing: table and plots from the finished runs in --output")
    compare.add_argument("--vary-test-split", action="store_true", help="each seed draws its own global test split (default: the first seed's for all)")
    compare.set_defaults(func=cmd_compare)
    study = sub.add_parser("study", help="a grid of factors × seeds, each cell a run folder; resumes, runs cells in parallel, tables and plots with CIs and paired tests")
    study.add_argument("study", metavar="STUDY.yaml", help="the study file: base config, factors, seeds (docs/study.md)")
    study.add_argument("--output", help="folder of the cells' run folders, tables and plots (default: beside STUDY.yaml, named after it)")
    study.add_argument("--jobs", type=int, default=1, help="cells side by side on this machine, each with its share of the CPU threads (and a GPU in turn)")
    study.add_argument("--threads", type=int, help="torch threads per cell (default: this machine's CPUs / --jobs)")
    study.add_argument("--ray", metavar="ADDRESS", help="run the cells as Ray tasks on this cluster (ray start …; run folders on storage every node sees)")
    study.add_argument("--only", metavar="GLOBS", help="run only the cells whose names match these comma-separated globs, e.g. 'flora-*,fedit-seed0'")
    study.add_argument("--dry-run", action="store_true", help="print the cells and an estimate of their cost (a timed first round per setting); run nothing")
    study.add_argument("--tables-only", action="store_true", help="run nothing: the tables and plots from the finished cells")
    study.set_defaults(func=cmd_study)
    deploy = sub.add_parser("deploy", help="run a config on a local Flower deployment (SuperLink + one SuperNode per client)")
    deploy.add_argument("config", nargs="?", help="YAML config (default: the packaged default.yaml)")
    deploy.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. federation.rounds=5")
    deploy.add_argument("--output", help="run folder (default: output.dir, else runs/<time>-<method>-flower); a new or empty folder")
    deploy.add_argument("--workdir", help="logs, certificates and node state (default: .<run folder>.flower beside the run folder)")
    deploy.add_argument("--resume", metavar="RUN_DIR", help="continue a deployed run from its newest complete checkpoint (same --workdir)")
    deploy.add_argument("--tls", action="store_true", help="TLS with a generated CA and server certificate")
    deploy.add_argument("--auth", action="store_true", help="SuperNode authentication with generated keys (implies --tls)")
    deploy.add_argument("--node-rank", action="append", default=[], metavar="K=R", help="SuperNode K declares LoRA rank R (repeatable)")
    deploy.set_defaults(func=cmd_deploy)
    report = sub.add_parser("report", help="markdown summary and PNG plots of one or more run folders")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders; several are overlaid")
    report.add_argument("--out", help="folder for report.md and the PNGs (default: the first RUN_DIR)")
    report.set_defaults(func=cmd_report)
    export = sub.add_parser("export", help="a run's global model as a standard PEFT adapter, or merged (--merged)")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--out", required=True, help="a new or empty folder")
    export.add_argument("--rank", type=int, help="adapter rank (default: exact; flora/zeropad: smallest with ≤ 1%% error per layer)")
    export.add_argument("--merged", action="store_true", help="write W_0 + ΔW as a full model folder with the tokenizer")
    export.add_argument("--client", type=int, help="client K of a personal-method run (local)")
    export.set_defaults(func=cmd_export)
    ev = sub.add_parser("eval", help="held-out loss/perplexity or multiple-choice accuracy of a run or model folder, and generations")
    ev.add_argument("path", metavar="RUN_DIR|MODEL_DIR", help="a run folder, an exported adapter or a full model folder")
    ev.add_argument("--data", help="a data file (held-out loss), or MMLU-format JSONL: question, choices, answer (accuracy)")
    ev.add_argument("--prompt", action="append", default=[], help="a prompt to answer greedily (repeatable)")
    ev.add_argument("--generate", type=int, default=3, help="without --prompt: answer the data file's first N prompts (default 3)")
    ev.add_argument("--max-new-tokens", type=int, default=48)
    ev.add_argument("--max-length", type=int, help="tokens per example (default: the run's train.max_length, else 256)")
    ev.add_argument("--client", type=int, help="client K's model of a personal-method run (local)")
    ev.add_argument("--base", metavar="MODEL_DIR", help="an exported adapter's base model folder, where the adapter's own hint does not find it")
    ev.add_argument("--lm-eval", metavar="TASK", help="lm-eval-harness on TASK (a task YAML, or MMLU-format JSONL), beside fedlora's own scorer")
    ev.add_argument("--limit", type=int, help="--lm-eval: the first N questions only (no comparison with fedlora's scorer)")
    ev.add_argument("--json", help="also write the results to this JSON file")
    ev.set_defaults(func=cmd_eval)
    return parser


def _log_handler() -> logging.Handler:
    """Rich on a terminal; in a file or a pipe plain timestamped lines, unwrapped, and no library progress bars."""
    if console.is_terminal:
        return RichHandler(console=console, show_path=False)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    return handler


def _install_log_handler(level: int) -> None:
    """This call's handler on the root logger, in place of an earlier call's (whose stream may be closed by now),
    leaving every other handler (a host program's, pytest's) as it is."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "fedlora", False)]:
        root.removeHandler(old)
    handler = _log_handler()
    handler.fedlora = True  # type: ignore[attr-defined]
    if handler.formatter is None:
        handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def _end_with_parent() -> None:
    """A cell of ``fedlora study`` ends with the study (SIGTERM when its parent dies; a checkpoint resumes it)."""
    parent = os.environ.pop("FEDLORA_PARENT", None)
    if parent and sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if ledger := os.environ.pop("FEDLORA_LEDGER", None):
            from fedlora.study.ledger import record_when_terminated

            record_when_terminated(ledger, os.environ.pop("FEDLORA_CELL", "?"))
        if os.getppid() != int(parent):  # the study died before this line
            sys.exit(143)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _end_with_parent()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra  # key=value after the options: `fedlora compare CFG --seeds 3 k=v`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)  # `fedlora run key=value` with the default config
        args.config = None
    _install_log_handler(logging.DEBUG if args.verbose else logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices are not the user's business
    for noisy in ("transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # datasets logs a failed read at ERROR through its own handler, bound to the stderr of its import (a closed one,
    # in a host that captures output); fedlora reports the failure itself, in one line
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except _user_errors() as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # brackets in it are text, not markup
        return 2
    except (KeyboardInterrupt, Interrupted) as e:  # Ctrl-C: one line, not a traceback
        console.print(escape(str(e) or "interrupted"), highlight=False, soft_wrap=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
