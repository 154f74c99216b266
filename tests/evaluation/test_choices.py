"""Multiple-choice scoring on a hand-made three-question file with a hand-set bigram model (float64)."""

import json
from types import SimpleNamespace

import pytest
import torch

from fedlora.data import DataError
from fedlora.evaluation.choices import continuation_logliks, is_multiple_choice, read_questions, score_questions

from tests.evaluation.tiny_run import word_tokenizer

QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["London", "Rome", "Paris"], "answer": "C"},
    {"question": "What is two plus two?", "choices": ["four", "five", "three"], "answer": 0},
    {"question": "What color is the sky?", "choices": ["green", "blue sky", "red"], "answer": "b"},
]


class Bigram(torch.nn.Module):
    """logits[t] = table[token t]: the next token depends on the current one only."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def _table(tok, prefs: dict[tuple[str, str], float]) -> torch.Tensor:
    table = torch.zeros(len(tok), len(tok), dtype=torch.float64)
    for (prev, nxt), logit in prefs.items():
        table[tok.convert_tokens_to_ids(prev), tok.convert_tokens_to_ids(nxt)] = logit
    return table


def _file(tmp_path, records):
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_known_answers(tmp_path, tok):
    questions = read_questions(_file(tmp_path, QUESTIONS))
    assert [q.answer for q in questions] == [2, 0, 1]  # letter, index, lower-case letter
    model = Bigram(_table(tok, {("Answer:", "Paris"): 5.0, ("Answer:", "four"): 4.0, ("Answer:", "blue"): 3.0, ("blue", "sky"): 2.0}))
    s = score_questions(model, tok, questions, torch.device("cpu"))
    assert {k: s[k] for k in ("questions", "accuracy", "accuracy_norm", "accuracy_bytes", "picks")} == {
        "questions": 3, "accuracy": 1.0, "accuracy_norm": 1.0, "accuracy_bytes": 1.0, "picks": [2, 0, 1]}
    assert [max(range(3), key=ll.__getitem__) for ll in s["logliks"]] == s["picks"]
    # a model that prefers "red" to the sky's colour gets the third one wrong
    wrong = Bigram(_table(tok, {("Answer:", "Paris"): 5.0, ("Answer:", "four"): 4.0, ("Answer:", "red"): 3.0}))
    s = score_questions(wrong, tok, questions, torch.device("cpu"))
    assert s["picks"] == [2, 0, 2] and s["accuracy"] == pytest.approx(2 / 3)


def test_loglik_is_the_sum_over_the_continuations_tokens(tok):
    table = torch.randn(len(tok), len(tok), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = continuation_logliks(Bigram(table), tok, "Question: sky Answer:", [" blue sky", " red"], torch.device("cpu"))
    logp = torch.log_softmax(table, dim=-1)
    i = tok.convert_tokens_to_ids
    assert got[0] == pytest.approx(float(logp[i("Answer:"), i("blue")] + logp[i("blue"), i("sky")]), abs=1e-12)
    assert got[1] == pytest.approx(float(logp[i("Answer:"), i("red")]), abs=1e-12)  # padded row, same answer


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "'answer' is 'C' (accepted: an index 0..1 or a letter A..B)"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "'answer' is True"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "'choices' is ['a'] (accepted: a list of at least two"),
        ({"choices": ["a", "b"], "answer": 0}, "no 'question' text"),
    ],
)
def test_bad_records_name_line_and_field(tmp_path, record, message):
    path = _file(tmp_path, [QUESTIONS[0], record])
    assert is_multiple_choice(path)
    with pytest.raises(DataError, match="line 2") as e:
        read_questions(path)
    assert message in str(e.value)


def test_norm_divides_by_characters_and_bytes_by_utf8_bytes_as_lm_eval(monkeypatch):
    """acc: -3.0 beats -3.6; per character (3 vs 4) -1.0 loses to -0.9; per byte ("ééé" is 6) -0.5 wins again."""
    from fedlora.evaluation import choices

    monkeypatch.setattr(choices, "continuation_logliks", lambda *a: [-3.0, -3.6])
    q = choices.Question("Which?", ["ééé", "abcd"], 1)
    s = choices.score_questions(None, None, [q], torch.device("cpu"))
    assert (s["accuracy"], s["accuracy_norm"], s["accuracy_bytes"]) == (0.0, 1.0, 0.0)


def test_the_task_yaml_in_docs_use_md_is_the_one_fedlora_writes(tmp_path):
    """docs/use.md shows the lm-eval task for users to change: it must be what ``write_task`` writes (bar the path)."""
    import re
    from pathlib import Path

    import yaml

    from fedlora.evaluation.lm_eval_task import write_task

    text = (Path(__file__).resolve().parents[2] / "docs" / "use.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "dataset_path: json" in b]
    shown = yaml.safe_load(block)
    written = yaml.safe_load(write_task(tmp_path / "q.jsonl", tmp_path).read_text())
    shown["dataset_kwargs"]["data_files"]["test"] = written["dataset_kwargs"]["data_files"]["test"]
    assert shown == written
