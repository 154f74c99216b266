"""Benchmark 8: fedlora against the FLoRA paper's reference code (ATP-1010/FederatedLLM), same work.

Both sides train FLoRA (stacking, heterogeneous ranks, ``lora_alpha = 2·r_k`` on q_proj/v_proj, no
dropout) on the embedded SmolLM2-135M-Instruct, on the same clients' chatterbot training examples
(fedlora's own Dirichlet split: the reference reads each client's share from a JSON file written
here), with the same batch size, micro-batch size, cutoff (``train.max_length`` / ``cutoff_len``),
learning rate, local steps, rounds, precision and torch threads, each in its own subprocess:

- the reference: ``main.fl_finetune(..., stacking=True, heter=True, local_ranks=...)`` in a
  temporary copy of the checkout given by ``--reference`` (nothing is fetched, nothing is kept),
  after the compatibility edits below; its Hugging Face ``Trainer`` stops after ``max_steps`` =
  the local steps (it otherwise trains whole epochs);
- fedlora: ``fedlora run`` (``fedlora.cli.main``) with the same settings as overrides.

Measured on each side: real (non-pad) training tokens per second (tokens counted from each trained
micro-batch's attention mask — the reference's ``Trainer.training_step`` — or fedlora's FitStats,
over the seconds spent in the call that trains a client: ``Trainer.train`` / ``LocalTrainer.fit``),
the padded share of the trained tokens, wall time per round, the evaluation's share of a round,
and the subprocess's peak RSS (``os.wait4``). Targets: fedlora ≥ 1.3 × the reference's real
tokens/s and ≤ 1.0 × its peak RSS.

The evaluations differ by design and are reported, not matched: the reference scores MMLU by
sampling up to 32 answer tokens per question (``--ref-eval-examples`` of its 1,444-question dev
set; 0 skips it), fedlora computes held-out losses on its global and per-client test splits
(``--eval-examples`` each). The reference tokenizes with its Alpaca template, fedlora with the
model's chat template, so the two see slightly different token counts: compare tokens/s.

Compatibility edits applied to the copy (current transformers 5 / peft 0.2x; CPU):
main.py: no ``prepare_model_for_int8_training`` import (gone from peft); ``AutoTokenizer`` for
``LlamaTokenizer`` (SmolLM2 ships a BPE tokenizer.json, no SentencePiece model); the model loads
with ``dtype=float32`` only (``load_in_8bit``/``torch_dtype``/``device_map``/``token`` dropped); the
stacked adapter's ``r``/``lora_alpha`` are Σ r_k / 2·Σ r_k with ``heter`` (the code assumes
Σ r_k = lora_r · num_clients, true of its 10-client default only).
fed_utils/evaluation.py: the model's device instead of ``'cuda'``, CPU autocast (bfloat16 only
with ``--precision bfloat16``), no division by zero for MMLU subjects absent from the subset.
At run time: ``TrainingArguments`` gets ``eval_strategy`` for ``evaluation_strategy``,
``train_sampling_strategy`` for ``group_by_length``, ``fp16=False`` (``bf16`` with
``--precision bfloat16``), ``max_steps``, ``report_to="none"``, ``save_strategy="no"`` (transformers
≥ 4.43 saves a checkpoint when "steps" training ends; the reference's 4.40 with ``save_steps``
5,000,000 never saved); ``fire`` (unused when imported) is stubbed.

    .venv/bin/python bench/vs_reference.py --reference /path/to/FederatedLLM [--rounds 2] [--local-steps 3]
        [--clients 3 --ranks 8,4,2] [--batch-size 8] [--micro-batch-size 8] [--cutoff 128] [--threads 2]
        [--precision float32|bfloat16] [--eval-examples 16] [--ref-eval-examples 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHILD_REFERENCE, CHILD_FEDLORA = "_child-reference", "_child-fedlora"
NEEDED = ("main.py", "fed_utils/__init__.py", "fed_utils/client.py", "fed_utils/model_aggregation.py", "fed_utils/evaluation.py",
          "utils/prompter.py", "templates/alpaca.json")
DEV_SET = "mmlu_test_1444.jsonl"

# (file, old text, new text, why): each old text must occur exactly once in the checkout.
PATCHES: list[tuple[str, str, str, str]] = [
    ("main.py", "    prepare_model_for_int8_training,\n", "", "peft no longer has prepare_model_for_int8_training (unused)"),
    ("main.py", 'tokenizer = LlamaTokenizer.from_pretrained(global_model, token="your_token",)',
     "tokenizer = AutoTokenizer.from_pretrained(global_model)", "SmolLM2 has a BPE tokenizer.json, no SentencePiece model"),
    ("main.py",
     '        model = LlamaForCausalLM.from_pretrained(\n'
     '            global_model,\n'
     '            load_in_8bit=False,\n'
     '            torch_dtype=torch.float32,\n'
     '            device_map=device_map,\n'
     '            token="your token",\n'
     '        )',
     "        model = LlamaForCausalLM.from_pretrained(global_model, dtype=torch.float32)",
     "transformers 5: no load_in_8bit, dtype for torch_dtype; a local folder needs no token; CPU needs no device_map"),
    ("main.py", "                r = lora_r * num_clients,\n",
     "                r = sum(local_ranks) if heter else lora_r * num_clients,\n",
     "the stacked adapter's rank is the sum of the clients' ranks (the code assumes lora_r * num_clients)"),
    ("main.py", "                lora_alpha = lora_alpha * num_clients,\n",
     "                lora_alpha = 2 * sum(local_ranks) if heter else lora_alpha * num_clients,\n",
     "the stacked adapter keeps the clients' scale lora_alpha / r = 2"),
    ("fed_utils/evaluation.py", 'with torch.autocast("cuda"):',
     'with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=os.environ.get("VSREF_BF16") == "1"):',
     "evaluation on the model's device (CPU), bfloat16 autocast only when training uses it"),
    ("fed_utils/evaluation.py", "input =inputs[\"input_ids\"].to('cuda')", 'input =inputs["input_ids"].to(model.device)',
     "evaluation on the model's device"),
    ("fed_utils/evaluation.py", "tmp = right_count_dict[key]/total_count_dict[key]", "tmp = right_count_dict[key]/max(total_count_dict[key], 1)",
     "a subset of the MMLU dev set leaves subjects without a question"),
]


# ---- the reference's side --------------------------------------------------------------------------


def reference_problem(path: str | None) -> str | None:
    """Why ``path`` is not a usable FederatedLLM checkout (None: it is)."""
    if not path:
        return "no --reference PATH given (a checkout of github.com/ATP-1010/FederatedLLM)"
    root = Path(path).expanduser()
    if not root.is_dir():
        return f"--reference {path}: not a folder"
    if missing := [f for f in NEEDED if not (root / f).is_file()]:
        return f"--reference {path}: not a FederatedLLM checkout (missing {', '.join(missing)})"
    for file, old, _, _ in PATCHES:
        if (n := (root / file).read_text(encoding="utf-8", errors="replace").count(old)) != 1:
            return f"--reference {path}: {file} is not the version these compatibility edits know ({n} matches of {old.strip()[:50]!r})"
    return None


def copy_reference(src: Path, dst: Path) -> list[str]:
    """The checkout's code (not its data) in ``dst``, with the compatibility edits; their reasons."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "data_*", "*.jsonl", "__pycache__"))
    for file, old, new, _ in PATCHES:
        p = dst / file
        p.write_text(p.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    return [f"{file}: {why}" for file, _, _, why in PATCHES]


def child_reference(spec_path: str) -> int:
    """In the reference's copy: instrument, then ``main.fl_finetune``; write what was measured."""
    spec = json.loads(Path(spec_path).read_text())
    os.chdir(spec["workdir"])
    sys.path.insert(0, spec["workdir"])
    import types

    import torch

    torch.set_num_threads(spec["threads"])
    sys.modules.setdefault("fire", types.SimpleNamespace(Fire=lambda f: f))  # main.py imports it for its __main__ only
    import transformers

    bf16 = spec["precision"] == "bfloat16"
    os.environ["VSREF_BF16"] = "1" if bf16 else "0"
    original_init = transformers.TrainingArguments.__init__  # the class's own: transformers re-binds its module attributes

    def training_arguments(self: Any, *a: Any, **kw: Any) -> None:
        if "evaluation_strategy" in kw:
            kw["eval_strategy"] = kw.pop("evaluation_strategy")
        if "group_by_length" in kw:
            kw["train_sampling_strategy"] = "group_by_length" if kw.pop("group_by_length") else "random"
        kw.update(fp16=False, bf16=bf16, max_steps=spec["local_steps"], report_to="none", use_cpu=True, disable_tqdm=True,
                  save_strategy="no")  # transformers >= 4.43 saves a checkpoint at the end of "steps" training; its 4.40 never did
        original_init(self, *a, **kw)

    transformers.TrainingArguments.__init__ = training_arguments
    rec: dict[str, Any] = {"steps": [], "train": [], "eval": [], "round_starts": []}
    original_step = transformers.Trainer.training_step

    def training_step(self: Any, model: Any, inputs: dict, *a: Any, **kw: Any) -> Any:
        mask = inputs["attention_mask"]
        rec["steps"].append([int(mask.sum()), int(mask.numel())])
        rec.setdefault("threads_in_training", torch.get_num_threads())
        return original_step(self, model, inputs, *a, **kw)

    transformers.Trainer.training_step = training_step
    import fed_utils.client
    import main as ref_main

    original_train = fed_utils.client.GeneralClient.train

    def train(self: Any) -> Any:
        t0, before = time.perf_counter(), len(rec["steps"])
        out = original_train(self)
        rec["train"].append({"round": len(rec["round_starts"]), "client": int(self.client_id), "s": time.perf_counter() - t0,
                             "micro_batches": len(rec["steps"]) - before,
                             "real_tokens": sum(r for r, _ in rec["steps"][before:]), "tokens": sum(t for _, t in rec["steps"][before:])})
        return out

    fed_utils.client.GeneralClient.train = train
    original_selection = ref_main.client_selection

    def client_selection(*a: Any, **kw: Any) -> Any:
        rec["round_starts"].append(time.perf_counter())  # a round begins with its client selection
        return original_selection(*a, **kw)

    ref_main.client_selection = client_selection
    original_eval = ref_main.global_evaluation

    def global_evaluation(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        acc = original_eval(*a, **kw) if spec["eval_examples"] else None
        rec["eval"].append({"round": len(rec["round_starts"]), "s": time.perf_counter() - t0, "acc": acc})
        return acc if acc is not None else 0.0

    ref_main.global_evaluation = global_evaluation
    t0 = time.perf_counter()
    ref_main.fl_finetune(**spec["kwargs"])
    rec["end"] = time.perf_counter()
    rec["t0"] = t0
    rec["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(spec["stats"]).write_text(json.dumps(rec))
    return 0


def write_reference_data(cfg: Any, folder: Path) -> list[int]:
    """Each fedlora client's training examples as ``<folder>/<N>/local_training_<k>.json`` (Alpaca fields); their sizes."""
    from transformers import AutoTokenizer

    from fedlora.data import TokenizeStats, tokenize_examples
    from fedlora.federation.experiment import load_source, split_indices
    from fedlora.model.loading import resolve_model_dir

    examples = load_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(cfg.model.path), local_files_only=True)
    stats = TokenizeStats()
    tokenize_examples(examples, tokenizer, cfg.train.max_length, train_on_inputs=cfg.train.train_on_inputs, stats=stats)
    dropped = set(stats.dropped_indices)
    examples = [e for i, e in enumerate(examples) if i not in dropped]  # as fedlora's prepare() drops them
    info = split_indices(cfg, [e.category for e in examples])
    out = folder / str(cfg.federation.num_clients)
    out.mkdir(parents=True)
    sizes = []
    for c in info["clients"]:
        rows = [{"instruction": examples[i].prompt, "input": "", "context": "", "output": examples[i].response} for i in c["train_indices"]]
        (out / f"local_training_{c['id']}.json").write_text(json.dumps(rows, ensure_ascii=False))
        sizes.append(len(rows))
    return sizes


def write_dev_subset(reference: Path, n: int, seed: int, path: Path) -> int:
    """``n`` seeded questions of the reference's MMLU dev set (all subjects' order kept); how many."""
    src = reference / DEV_SET
    if n <= 0 or not src.is_file():
        path.write_text("[]")
        return 0
    rows = json.loads(src.read_text(encoding="utf-8"))
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    path.write_text(json.dumps([rows[i] for i in keep], ensure_ascii=False))
    return len(keep)


# ---- fedlora's side --------------------------------------------------------------------------------


def child_fedlora(stats_path: str, threads: int, argv: list[str]) -> int:
    """``fedlora run`` in this process, with each client's fit and each evaluation timed."""
    import torch

    torch.set_num_threads(threads)
    import fedlora.cli
    from fedlora.federation.server import Server
    from fedlora.train.local import LocalTrainer

    rec: dict[str, Any] = {"fits": [], "evals": []}
    original_fit, original_eval = LocalTrainer.fit, Server.evaluate

    def fit(self: Any, plan: Any, train: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        update, stats = original_fit(self, plan, train, *a, **kw)
        rec["fits"].append({"round": plan.round, "client": plan.client, "s": time.perf_counter() - t0, "steps": stats.steps,
                            "real_tokens": stats.real_tokens, "padded_tokens": stats.padded_tokens})
        rec.setdefault("threads_in_training", torch.get_num_threads())
        return update, stats

    def evaluate(self: Any, number: int = 0) -> Any:
        t0 = time.perf_counter()
        out = original_eval(self, number)
        rec["evals"].append({"round": number, "s": time.perf_counter() - t0})
        return out

    LocalTrainer.fit, Server.evaluate = fit, evaluate
    rc = fedlora.cli.main(argv)
    rec["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(stats_path).write_text(json.dumps(rec))
    return rc


# ---- the parent --------------------------------------------------------------------------------------


def run_child(cmd: list[str], env: dict[str, str], cwd: Path, log: Path, limit_s: float) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in MiB) of one subprocess, its output in ``log``."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        while True:  # wait4, not Popen.wait: it gives this child's own peak RSS
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > limit_s:
                child.kill()
                _, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.2)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def summarize_reference(rec: dict[str, Any], rounds: int) -> dict[str, Any]:
    starts = rec["round_starts"] + [rec["end"]]
    walls = [starts[i + 1] - starts[i] for i in range(rounds)]
    evals = [sum(e["s"] for e in rec["eval"] if e["round"] == r + 1) for r in range(rounds)]
    trains = [sum(t["s"] for t in rec["train"] if t["round"] == r + 1) for r in range(rounds)]
    real = sum(t["real_tokens"] for t in rec["train"])
    total = sum(t["tokens"] for t in rec["train"])
    train_s = sum(t["s"] for t in rec["train"])
    return {
        "real_tokens": real, "tokens": total, "padded_fraction": 1 - real / total if total else 0.0,
        "micro_batches": sum(t["micro_batches"] for t in rec["train"]), "train_s": train_s,
        "real_tokens_per_s": real / train_s if train_s else 0.0,
        "real_tokens_per_s_round_without_eval": real / (sum(walls) - sum(evals)),
        "round_wall_s": walls, "round_train_s": trains, "round_eval_s": evals,
        "eval_share": [e / w for e, w in zip(evals, walls)],
        "mmlu_acc_mean_of_57_subjects": [e["acc"] for e in rec["eval"]],  # its own figure: a subject absent from the subset counts 0
        "threads_in_training": rec.get("threads_in_training"), "before_rounds_s": rec["round_starts"][0] - rec["t0"] if rec["round_starts"] else None,
        "clients": rec["train"],
    }


def summarize_fedlora(rec: dict[str, Any], metrics: list[dict[str, Any]], summary: dict[str, Any], rounds: int) -> dict[str, Any]:
    by_round = {m["round"]: m for m in metrics}
    walls = [by_round[r]["wall_s"] for r in range(1, rounds + 1)]
    evals = [sum(e["s"] for e in rec["evals"] if e["round"] == r) for r in range(1, rounds + 1)]
    trains = [sum(f["s"] for f in rec["fits"] if f["round"] == r) for r in range(1, rounds + 1)]
    real = sum(f["real_tokens"] for f in rec["fits"])
    padded = sum(f["padded_tokens"] for f in rec["fits"])
    train_s = sum(f["s"] for f in rec["fits"])
    return {
        "real_tokens": real, "tokens": real + padded, "padded_fraction": padded / (real + padded) if real + padded else 0.0,
        "steps": sum(f["steps"] for f in rec["fits"]), "train_s": train_s, "real_tokens_per_s": real / train_s if train_s else 0.0,
        "real_tokens_per_s_round_without_eval": real / (sum(walls) - sum(evals)),
        "round_wall_s": walls, "round_train_s": trains, "round_eval_s": evals, "eval_share": [e / w for e, w in zip(evals, walls)],
        "round0_eval_s": by_round.get(0, {}).get("wall_s"), "global_loss": summary.get("global_loss"),
        "summary_padded_fraction": summary.get("padded_fraction"), "summary_wall_s": summary.get("wall_s"),
        "summary_peak_rss_mb": summary.get("peak_rss_mb"), "threads_in_training": rec.get("threads_in_training"), "clients": rec["fits"],
    }


def fedlora_overrides(args: argparse.Namespace, ranks: list[int], out: Path) -> list[str]:
    return [
        "federation.method=flora", f"federation.num_clients={args.clients}", f"lora.ranks=[{','.join(map(str, ranks))}]", "lora.scale=2.0",
        "lora.target_modules=[q_proj,v_proj]", "lora.dropout=0.0", "federation.fraction=1.0", f"federation.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}", f"train.batch_size={args.batch_size}", f"train.micro_batch_size={args.micro_batch_size}",
        f"train.max_length={args.cutoff}", f"train.lr={args.lr}", f"train.precision={args.precision}", "train.train_on_inputs=false",
        "model.device=cpu", "model.dtype=float32", "data.source=chatterbot", f"eval.max_examples={args.eval_examples}", "eval.every=1",
        f"seed={args.seed}", "output.save_final=false", f"output.dir={out}", *args.overrides,
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CHILD_REFERENCE]:
        return child_reference(argv[1])
    if argv[:1] == [CHILD_FEDLORA]:
        return child_fedlora(argv[1], int(argv[2]), argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", default=os.environ.get("FLORA_REFERENCE"), help="a checkout of ATP-1010/FederatedLLM (or $FLORA_REFERENCE)")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 local step, 4 evaluation examples: a functional check")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--ranks", default="8,4,2", help="one rank per client, cycled if fewer")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=3, help="optimizer steps per client per round (the reference's max_steps)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (the reference's local_batch_size)")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="examples per forward pass (local_micro_batch_size)")
    ap.add_argument("--cutoff", type=int, default=128, help="tokens per example (train.max_length / cutoff_len)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--precision", choices=("float32", "bfloat16"), default="float32", help="both sides (the reference's fp16 AMP is a GPU's)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--eval-examples", type=int, default=16, help="fedlora: eval.max_examples (each test split)")
    ap.add_argument("--ref-eval-examples", type=int, default=16, help="the reference: MMLU dev questions per evaluation (0: none)")
    ap.add_argument("--ref-group-by-length", action="store_true", help="the reference's --group_by_length (its default: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds each side may run")
    ap.add_argument("--keep", type=Path, default=None, help="keep the reference copy, data, logs and run folders here")
    ap.add_argument("--out", type=Path, default=None, help="result file (default bench/results/vs_reference[_quick].json)")
    ap.add_argument("overrides", nargs="*", help="extra fedlora key=value overrides (the reference side does not see them)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.local_steps, args.eval_examples, args.ref_eval_examples = 1, 1, 4, 4
    if problem := reference_problem(args.reference):
        print(f"vs_reference: {problem}; nothing measured")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    import torch

    import benchlib
    from fedlora.config import load_config, packaged_config

    torch.set_num_threads(args.threads)
    load = benchlib.uptime()
    reference = Path(args.reference).expanduser().resolve()
    pattern = [int(x) for x in args.ranks.split(",")]
    ranks = [pattern[k % len(pattern)] for k in range(args.clients)]
    tmp = Path(tempfile.mkdtemp(prefix="vs-reference-")) if args.keep is None else args.keep.resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        cfg = load_config(packaged_config("default"), fedlora_overrides(args, ranks, tmp / "fedlora-run"))
        edits = copy_reference(reference, tmp / "reference")
        sizes = write_reference_data(cfg, tmp / "data")
        dev = write_dev_subset(reference, args.ref_eval_examples, args.seed, tmp / "dev.json")
        if args.ref_eval_examples and not dev:
            print(f"vs_reference: {reference / DEV_SET} not found: the reference side runs without its evaluation")
        from fedlora.model.loading import resolve_model_dir

        model_dir = str(resolve_model_dir(cfg.model.path))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": "",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "hf-datasets"),
               "TOKENIZERS_PARALLELISM": "false"}
        kwargs = {
            "global_model": model_dir, "data_path": str(tmp / "data"), "output_dir": str(tmp / "reference-out") + "/",
            "num_communication_rounds": args.rounds, "num_clients": args.clients, "client_selection_frac": 1.0,
            "local_batch_size": args.batch_size, "local_micro_batch_size": args.micro_batch_size, "local_num_epochs": 1,
            "local_learning_rate": args.lr, "cutoff_len": args.cutoff, "lora_r": max(ranks), "lora_alpha": 2 * max(ranks), "lora_dropout": 0.0,
            "lora_target_modules": ["q_proj", "v_proj"], "train_on_inputs": False, "group_by_length": args.ref_group_by_length,
            "stacking": True, "heter": True, "local_ranks": ranks, "zero_padding": False, "dev_data_path": str(tmp / "dev.json"),
        }
        spec = {"workdir": str(tmp / "reference"), "threads": args.threads, "precision": args.precision, "local_steps": args.local_steps,
                "eval_examples": dev, "kwargs": kwargs, "stats": str(tmp / "reference-stats.json")}
        (tmp / "reference-spec.json").write_text(json.dumps(spec, indent=1))
        print(f"vs_reference: the reference code ({args.clients} clients, ranks {ranks}, {args.rounds} rounds of {args.local_steps} steps) ...", flush=True)
        rc, ref_wall, ref_rss = run_child([sys.executable, str(Path(__file__).resolve()), CHILD_REFERENCE, str(tmp / "reference-spec.json")],
                                          env, tmp / "reference", tmp / "reference.log", args.timeout)
        if rc != 0:
            print(f"vs_reference: the reference code failed (exit {rc}); its log ({tmp / 'reference.log'}) ends:\n{tail(tmp / 'reference.log')}")
            return 1
        print("vs_reference: fedlora run ...", flush=True)
        fed_argv = ["run", str(packaged_config("default")), *fedlora_overrides(args, ranks, tmp / "fedlora-run")]
        rc, fed_wall, fed_rss = run_child([sys.executable, str(Path(__file__).resolve()), CHILD_FEDLORA, str(tmp / "fedlora-stats.json"),
                                           str(args.threads), *fed_argv], env, REPO, tmp / "fedlora.log", args.timeout)
        if rc != 0:
            print(f"vs_reference: fedlora run failed (exit {rc}); its log ({tmp / 'fedlora.log'}) ends:\n{tail(tmp / 'fedlora.log')}")
            return 1
        ref = summarize_reference(json.loads((tmp / "reference-stats.json").read_text()), args.rounds)
        run_dir = tmp / "fedlora-run"
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        fed = summarize_fedlora(json.loads((tmp / "fedlora-stats.json").read_text()), metrics, json.loads((run_dir / "summary.json").read_text()), args.rounds)
        partition = json.loads((run_dir / "partition.json").read_text())
        fed_sizes = [c["train"] for c in partition["clients"]]
        assert fed_sizes == sizes, f"the reference's client data {sizes} is not fedlora's {fed_sizes}"
        ok = True
    finally:
        if args.keep is None and ok:
            shutil.rmtree(tmp, ignore_errors=True)
        elif not ok:
            print(f"vs_reference: the copy, data, logs and run folders are kept in {tmp}")
    ref.update(process_wall_s=ref_wall, peak_rss_mib=ref_rss)
    fed.update(process_wall_s=fed_wall, peak_rss_mib=fed_rss)
    tps_ratio = fed["real_tokens_per_s"] / ref["real_tokens_per_s"] if ref["real_tokens_per_s"] else float("nan")
    rss_ratio = fed_rss / ref_rss
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    rows = [
        ("real tokens trained", f"{ref['real_tokens']}", f"{fed['real_tokens']}", ""),
        ("padded share", f"{ref['padded_fraction']:.1%}", f"{fed['padded_fraction']:.1%}", ""),
        ("real tokens/s (training)", f"{ref['real_tokens_per_s']:.1f}", f"{fed['real_tokens_per_s']:.1f}", f"{tps_ratio:.2f}×  (target ≥ 1.3)"),
        ("real tokens/s (round − eval)", f"{ref['real_tokens_per_s_round_without_eval']:.1f}", f"{fed['real_tokens_per_s_round_without_eval']:.1f}",
         f"{fed['real_tokens_per_s_round_without_eval'] / ref['real_tokens_per_s_round_without_eval']:.2f}×"),
        ("wall per round, s", f"{mean(ref['round_wall_s']):.1f}", f"{mean(fed['round_wall_s']):.1f}", ""),
        ("  of it training, s", f"{mean(ref['round_train_s']):.1f}", f"{mean(fed['round_train_s']):.1f}", ""),
        ("  of it evaluation", f"{mean(ref['eval_share']):.0%}", f"{mean(fed['eval_share']):.0%}", ""),
        ("peak RSS, MiB", f"{ref_rss:.0f}", f"{fed_rss:.0f}", f"{rss_ratio:.2f}×  (target ≤ 1.0)"),
        ("process wall, s", f"{ref_wall:.0f}", f"{fed_wall:.0f}", ""),
    ]
    print(f"\n{'':28s} {'reference':>12s} {'fedlora':>12s}  fedlora / reference")
    for name, a, b, c in rows:
        print(f"{name:28s} {a:>12s} {b:>12s}  {c}")
    results = {
        "reference": {"path": str(reference), "commit": git_commit(reference), "compatibility_edits": edits + RUNTIME_EDITS, **ref},
        "fedlora": {"overrides": fedlora_overrides(args, ranks, Path("<tmp>/fedlora-run")), **fed},
        "settings": {"model": model_dir, "clients": args.clients, "ranks": ranks, "client_train_examples": sizes, "rounds": args.rounds,
                     "local_steps": args.local_steps, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
                     "cutoff": args.cutoff, "lr": args.lr, "precision": args.precision, "threads": args.threads,
                     "fedlora_eval_examples_per_split": args.eval_examples, "reference_mmlu_eval_examples": dev,
                     "reference_group_by_length": args.ref_group_by_length},
        "ratios": {"real_tokens_per_s": tps_ratio, "peak_rss": rss_ratio},
    }
    targets = [benchlib.target("fedlora / reference real tokens per second", ">=", 1.3, tps_ratio),
               benchlib.target("fedlora / reference peak RSS", "<=", 1.0, rss_ratio)]
    benchlib.write("vs_reference", args.quick, load, targets, results, args.out)
    return 0


RUNTIME_EDITS = [
    "TrainingArguments: eval_strategy for evaluation_strategy, train_sampling_strategy for group_by_length (transformers 5)",
    "TrainingArguments: fp16=False (bf16 with --precision bfloat16), use_cpu; max_steps = the local steps (it trains epochs otherwise); report_to none",
    "TrainingArguments: save_strategy no (transformers >= 4.43 saves a checkpoint at the end of training; with save_steps=5000000 the reference's 4.40 never saved)",
    "fire stubbed (main.py imports it for its __main__ only)",
]


def git_commit(path: Path) -> str | None:
    if not (path / ".git").exists():
        return None
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
