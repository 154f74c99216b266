"""`fedlora eval PATH --lm-eval TASK`: lm-eval-harness, offline, on a run's model, beside fedlora's own scorer.

TASK is an lm-eval task YAML, or an MMLU-format JSONL file (question, choices, answer) for which
``write_task`` writes the task YAML: ``dataset_path: json`` over that file, and the prompt and
choices of ``fedlora.evaluation.choices``. A run folder or adapter is first merged into a full
model folder (``fedlora export --merged``) in a temporary folder, because lm-eval loads model
folders. When the task's data is an MMLU-format file, fedlora's own scorer runs on it too and
the result says whether every pick agrees.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from fedlora.data import DataError
from fedlora.evaluation.runs import RunFolderError, is_run_dir

TASK = "fedlora_multiple_choice"
METRICS = {"acc": "accuracy", "acc_norm": "accuracy_norm", "acc_bytes": "accuracy_bytes"}
"""lm-eval's metric → fedlora's key for the same number."""


def write_task(questions: Path, folder: Path, name: str = TASK) -> Path:
    """The lm-eval task YAML of an MMLU-format JSONL file, with fedlora's prompt; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task_spec(questions, name), sort_keys=False, allow_unicode=True))
    return path


def task_spec(questions: Path, name: str = TASK) -> dict[str, Any]:
    """The task: ``dataset_path: json`` over the file, and the prompt, choices and metrics of ``fedlora.evaluation.choices``."""
    questions = Path(questions).resolve()
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(questions)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices",
        "doc_to_target": "{{answer if answer is number else 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'.index(answer | trim | upper)}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
    }


def run_lm_eval(path: str | Path, task: str | Path, *, batch_size: int = 8, limit: int | None = None, device: str = "auto") -> dict[str, Any]:
    """lm-eval's accuracies on ``task`` (and fedlora's own, when the data is an MMLU-format file), as a JSON-able dict."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DataError("--lm-eval needs lm-eval-harness (accepted: pip install -e \".[lmeval]\" in the fedlora checkout)") from None
    from fedlora.evaluation.choices import is_multiple_choice, read_questions
    from fedlora.model.loading import pick_device, pick_dtype

    task, path = Path(task), Path(path)
    if not task.is_file():
        raise DataError(f"--lm-eval: file not found: {task} (accepted: an lm-eval task YAML, or an MMLU-format .jsonl file)")
    dev = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="fedlora-lm-eval-") as tmp:
        if is_multiple_choice(task):
            read_questions(task)  # a bad line is one line naming it, before lm-eval loads anything
            questions, task_yaml = task, write_task(task, Path(tmp) / "task")
        elif task.suffix in (".yaml", ".yml"):
            task_yaml, questions = _stage(task, Path(tmp) / "task"), _questions_of(task)
        else:
            raise DataError(f"--lm-eval: {task} is neither a task YAML nor MMLU-format JSONL (accepted: .yaml with a task, or .jsonl with question, choices, answer)")
        name = _task_name(task_yaml)
        model_dir = _model_folder(path, Path(tmp) / "merged")
        dtype = str(pick_dtype("auto", dev)).removeprefix("torch.")
        import lm_eval.evaluator as evaluator

        probe, evaluator.get_git_commit_hash = evaluator.get_git_commit_hash, _git_hash  # theirs prints git's "fatal: not a git repository"
        try:
            out = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(model_dir), "dtype": dtype, "device": str(dev)},
                tasks=[name], task_manager=TaskManager(include_path=str(task_yaml.parent), include_defaults=False),
                batch_size=batch_size, limit=limit, log_samples=True, bootstrap_iters=0,
            )
        finally:
            evaluator.get_git_commit_hash = probe
        scores = out["results"][name]
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        result: dict[str, Any] = {
            "model": str(path), "task": name, "task_yaml": str(task), "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "questions": len(samples), "dtype": dtype,
            "lm_eval": {METRICS.get(k.split(",")[0], k.split(",")[0]): v for k, v in scores.items() if k.endswith(",none") and "stderr" not in k},
        }
        if out["configs"][name].get("output_type") == "multiple_choice":
            result["lm_eval_logliks"] = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        if questions is not None and limit is None:  # both scorers on the same merged weights, in the same dtype
            ours = _fedlora_scores(model_dir, questions, device)
            if len(ours["logliks"]) == len(result.get("lm_eval_logliks", [])) and all(
                    len(a) == len(b) for a, b in zip(ours["logliks"], result["lm_eval_logliks"])):
                result["fedlora"] = ours
                result["agree"] = _agreement(result)
    return result


def _git_hash() -> str | None:
    """lm-eval's record of the folder's git commit, without git's complaint outside a checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _fedlora_scores(path: Path, questions: Path, device: str) -> dict[str, Any]:
    from fedlora.evaluation.choices import read_questions, score_questions
    from fedlora.evaluation.models import load_for_eval

    m = load_for_eval(path, None, device)
    return score_questions(m.model, m.tokenizer, read_questions(questions), m.device)


def _agreement(result: dict[str, Any]) -> dict[str, Any]:
    """Whether each accuracy is the same number, and how far apart the log-likelihoods are."""
    ours, theirs = result["fedlora"], result["lm_eval"]
    gap = max(abs(a - b) for x, y in zip(ours["logliks"], result["lm_eval_logliks"], strict=True) for a, b in zip(x, y, strict=True))
    return {**{k: ours[k] == theirs[k] for k in METRICS.values() if k in theirs}, "max_loglik_gap": gap}


def _task_name(task_yaml: Path) -> str:
    spec = _spec(task_yaml)
    if not isinstance(spec.get("task"), str):
        raise DataError(f"--lm-eval: {task_yaml} names no `task` (accepted: an lm-eval task YAML with task: NAME)")
    return spec["task"]


class _AnyTag(yaml.SafeLoader):
    """Reads lm-eval task YAMLs, whose ``!function module.name`` tags plain YAML does not know (as None)."""


_AnyTag.add_multi_constructor("!", lambda loader, suffix, node: None)
SAME_PROMPT = ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter")
"""What a user's task must share with ``write_task``'s for fedlora's scorer to ask the same questions."""


def _spec(task_yaml: Path) -> dict[str, Any]:
    try:
        spec = yaml.load(task_yaml.read_text(), Loader=_AnyTag)
    except yaml.YAMLError as e:
        raise DataError(f"--lm-eval: {task_yaml} is not YAML ({str(e).splitlines()[0]}) (accepted: an lm-eval task YAML)") from None
    return spec if isinstance(spec, dict) else {}


def _questions_of(task_yaml: Path) -> Path | None:
    """The MMLU-format file a task YAML reads, when it asks fedlora's questions (then fedlora's scorer runs on it too)."""
    from fedlora.evaluation.choices import is_multiple_choice

    spec, ours = _spec(task_yaml), task_spec(Path("questions.jsonl"))
    if any(spec.get(k) != ours[k] for k in SAME_PROMPT) or spec.get("process_docs") or spec.get("num_fewshot"):
        return None
    found = _data_files(spec)
    return found[0] if len(found) == 1 and is_multiple_choice(found[0]) else None


def _data_files(spec: dict[str, Any]) -> list[Path]:
    """The local files a task reads (``dataset_kwargs.data_files``: a path, a list, or a split → path(s) map)."""
    files = (spec.get("dataset_kwargs") or {}).get("data_files", {})
    found: list[Path] = []
    for f in files.values() if isinstance(files, dict) else [files]:
        found += [Path(x) for x in (f if isinstance(f, list) else [f]) if isinstance(x, str)]
    return found


def _stage(task_yaml: Path, folder: Path) -> Path:
    """The task YAML alone in a folder, for lm-eval to index: its own folder may hold many more (a checkout, a venv).

    The Python files beside it come along (``!function utils.x``), and a relative ``include:`` is made absolute."""
    import shutil

    spec = _spec(task_yaml)
    missing = [str(f) for f in _data_files(spec) if "://" not in str(f) and not f.is_file()]
    if missing:
        raise DataError(f"--lm-eval: {task_yaml} reads {missing[0]}, which is not a file here (accepted: data_files that exist; a relative one counts from {Path.cwd()})")
    folder.mkdir(parents=True, exist_ok=True)
    text = task_yaml.read_text()
    include = spec.get("include")
    if isinstance(include, str) and not Path(include).is_absolute():
        text = text.replace(include, str((task_yaml.parent / include).resolve()), 1)
    for helper in task_yaml.parent.glob("*.py"):
        shutil.copy(helper, folder / helper.name)
    staged = folder / f"{task_yaml.stem}.yaml"
    staged.write_text(text)
    return staged


def _model_folder(path: Path, scratch: Path) -> Path:
    """A full model folder lm-eval can load: the folder itself, or a run / adapter merged into ``scratch``."""
    if (path / "config.json").is_file() and not is_run_dir(path):
        return path
    if is_run_dir(path):
        from fedlora.evaluation.export_run import export_run

        export_run(path, scratch, merged=True)
        return scratch
    if (path / "adapter_config.json").is_file():
        from fedlora.evaluation.models import load_for_eval

        m = load_for_eval(path)  # base + adapter, merged
        m.model.save_pretrained(scratch, safe_serialization=True)
        m.tokenizer.save_pretrained(scratch)
        return scratch
    raise RunFolderError(f"RUN_DIR|MODEL_DIR: {path} is neither a run folder, an adapter nor a model folder (accepted: a folder from fedlora run or fedlora export)")


def describe(result: dict[str, Any]) -> list[str]:
    """Plain lines for the terminal."""
    theirs = " · ".join(f"{k} {v:.4f}" for k, v in result["lm_eval"].items())
    lines = [f"lm-eval-harness {result['lm_eval_version']}, task {result['task']} ({result['questions']} questions, {result['dtype']}): {theirs}"]
    if ours := result.get("fedlora"):
        lines.append("fedlora's scorer on the same file: " + " · ".join(f"{k} {ours[k]:.4f}" for k in METRICS.values()))
        agree = result["agree"]
        same = all(v for k, v in agree.items() if k != "max_loglik_gap")
        lines.append(f"{'the same' if same else 'NOT the same'} accuracies; log-likelihoods at most {agree['max_loglik_gap']:.2e} apart")
    return lines

