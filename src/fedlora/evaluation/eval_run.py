"""`fedlora eval RUN_DIR|MODEL_DIR [--data FILE] [--prompt TEXT …]`: numbers and generations.

A data file in MMLU format (JSONL with question, choices, answer) is scored by multiple-choice
log-likelihood; any other data file by held-out loss and perplexity. Greedy generations follow
for the ``--prompt`` texts, or else for the file's first ``generate`` prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from fedlora.data import DataError
from fedlora.evaluation.choices import is_multiple_choice, read_questions, score_questions
from fedlora.evaluation.heldout import greedy, heldout_metrics
from fedlora.evaluation.models import load_for_eval


def run_eval(
    path: str | Path, data: str | Path | None = None, *, client: int | None = None, prompts: Sequence[str] = (),
    generate: int = 3, max_new_tokens: int = 48, max_length: int | None = None, batch_size: int = 8, device: str = "auto",
    base: str | Path | None = None,
) -> dict[str, Any]:
    """Everything `fedlora eval` reports, as a JSON-able dict."""
    if data is None and not prompts:
        raise DataError("--data: nothing to evaluate (accepted: --data FILE, or at least one --prompt TEXT)")
    if data is not None and not Path(data).is_file():
        raise DataError(f"--data: file not found: {data} (accepted: a .jsonl/.json/.csv/.parquet file)")
    if generate < 0 or max_new_tokens < 1:
        raise DataError(f"--generate/--max-new-tokens: {generate}/{max_new_tokens} (accepted: --generate >= 0, --max-new-tokens >= 1)")
    m = load_for_eval(path, client, device, base)
    result: dict[str, Any] = {"model": m.what}
    file_prompts: list[str] = []
    if data is not None:
        data = Path(data)
        result["data"] = str(data)
        if is_multiple_choice(data):
            questions = read_questions(data)
            result["multiple_choice"] = score_questions(m.model, m.tokenizer, questions, m.device)
            file_prompts = [q.question for q in questions]
        else:
            used = max_length or m.max_length
            result["heldout"], file_prompts = heldout_metrics(m.model, m.tokenizer, data, m.device, used, batch_size, m.train_on_inputs)
            # the scored tokens depend on the truncation: a run's own max_length or the default; say which
            result["heldout"]["max_length"] = used
            result["heldout"]["max_length_from"] = "--max-length" if max_length else m.max_length_from
    asked = list(prompts) or file_prompts[:generate]
    result["generations"] = [{"prompt": p, "output": o} for p, o in zip(asked, greedy(m.model, m.tokenizer, asked, m.device, max_new_tokens))]
    return result


def describe(result: dict[str, Any]) -> list[str]:
    """Plain lines for the terminal."""
    lines = [result["model"]]
    if h := result.get("heldout"):
        lines.append(f"held-out loss {h['loss']:.4f} nats/token · perplexity {h['perplexity']:.2f} · {h['examples']} examples, {h['answer_tokens']} answer tokens "
                     f"at max length {h['max_length']} ({h['max_length_from']}; give two models the same --max-length to score the same tokens) ({result['data']})")
    if mc := result.get("multiple_choice"):
        lines.append(f"multiple choice: accuracy {mc['accuracy']:.4f} · accuracy_norm {mc['accuracy_norm']:.4f} · accuracy_bytes {mc['accuracy_bytes']:.4f} · {mc['questions']} questions ({result['data']})")
    for g in result["generations"]:
        lines += [f"> {g['prompt']}", f"  {g['output']}"]
    return lines
