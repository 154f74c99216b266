"""Multiple-choice accuracy by log-likelihood, on MMLU-format JSONL.

One JSON object per line: ``question`` (text), ``choices`` (list of texts) and ``answer`` (the
correct choice's index from 0, or its letter A, B, …). Each choice is scored as the
continuation " <choice>" of the context "Question: <question>\\nAnswer:" — the sum of its
tokens' log-probabilities, log p(c | ctx) = Σ_t log p(c_t | ctx, c_<t) — and the highest wins
(``accuracy``). So that long choices are not penalised for their length, ``accuracy_norm``
divides each sum by the choice's length in characters and ``accuracy_bytes`` by its length in
UTF-8 bytes.

Everything here is what lm-eval-harness does for a ``multiple_choice`` task with this prompt
(``fedlora.evaluation.lm_eval_task`` writes that task): the context and each continuation are
tokenized together and split after the context's own tokens, and the three accuracies are its
``acc``, ``acc_norm`` and ``acc_bytes``. ``fedlora eval --lm-eval`` runs both and compares them.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from fedlora.data import DataError

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Question:
    question: str
    choices: list[str]
    answer: int  # index into choices

    @property
    def context(self) -> str:
        return f"Question: {self.question}\nAnswer:"


def is_multiple_choice(path: Path) -> bool:
    """A .jsonl file whose first record has ``question`` and ``choices``."""
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open() as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "question" in record and "choices" in record


def read_questions(path: Path) -> list[Question]:
    """Every line of an MMLU-format JSONL file, checked; a bad line fails naming the file, line and field."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"--data: {path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{where} is not JSON (accepted: one object per line with question, choices, answer)") from None
        out.append(_question(record, where))
    if not out:
        raise DataError(f"--data: {path} holds no questions (accepted: one object per line with question, choices, answer)")
    return out


def _question(record: Any, where: str) -> Question:
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise DataError(f"{where}: no 'question' text (accepted: an object with question, choices, answer)")
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' is {choices!r} (accepted: a list of at least two non-empty texts)")
    answer = record.get("answer")
    letters = LETTERS[: len(choices)]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in letters:
        index = letters.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        index = answer
    else:
        raise DataError(f"{where}: 'answer' is {answer!r} (accepted: an index 0..{len(choices) - 1} or a letter {letters[0]}..{letters[-1]})")
    return Question(record["question"], choices, index)


@torch.no_grad()
def continuation_logliks(model: torch.nn.Module, tokenizer: Any, context: str, continuations: Sequence[str], device: torch.device) -> list[float]:
    """log p(continuation | context) for each continuation, summed over its tokens, in one padded batch.

    As lm-eval-harness tokenizes a pair: the context's trailing spaces move to the continuation,
    context + continuation is tokenized whole, and the continuation is what follows the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuations = context[:-spaces], [context[-spaces:] + c for c in continuations]
    ctx = list(tokenizer(context)["input_ids"])
    conts = [list(tokenizer(context + c)["input_ids"])[len(ctx):] for c in continuations]
    width = len(ctx) + max(len(c) for c in conts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(conts), width), int(pad), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, c in enumerate(conts):
        ids[row, : len(ctx) + len(c)] = torch.tensor(ctx + c)
        mask[row, : len(ctx) + len(c)] = 1
    logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.double(), dim=-1)  # (n, L, V)
    out = []
    for row, c in enumerate(conts):
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c))  # the logits that predict c's tokens
        out.append(float(logp[row, positions, torch.tensor(c)].sum()))
    return out


def score_questions(model: torch.nn.Module, tokenizer: Any, questions: Sequence[Question], device: torch.device) -> dict[str, Any]:
    """accuracy, accuracy_norm (per character), accuracy_bytes (per UTF-8 byte), each question's pick and log-likelihoods."""
    picks: dict[str, list[int]] = {"accuracy": [], "accuracy_norm": [], "accuracy_bytes": []}
    logliks = []
    for q in questions:
        ll = continuation_logliks(model, tokenizer, q.context, [" " + c for c in q.choices], device)
        logliks.append(ll)
        for key, length in (("accuracy", lambda c: 1), ("accuracy_norm", len), ("accuracy_bytes", lambda c: len(c.encode()))):
            scores = [v / length(c) for v, c in zip(ll, q.choices)]
            picks[key].append(max(range(len(scores)), key=scores.__getitem__))  # the first of equal scores, as numpy's argmax
    n = len(questions)
    out: dict[str, Any] = {"questions": n}
    out.update({key: sum(p == q.answer for p, q in zip(chosen, questions)) / n for key, chosen in picks.items()})
    out.update(picks=picks["accuracy"], logliks=logliks)
    return out
