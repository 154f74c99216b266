"""lm-eval-harness end to end, offline: a run folder merged into a model folder, a local MMLU-format task,
and lm-eval's acc / acc_norm / acc_bytes equal to fedlora's own scorer on the same file.

The model is a tiny random Llama (word-level tokenizer): the claim is about prompts, tokenization
and normalisation, which a real model does not change. Marked slow: lm-eval's import alone takes seconds.
"""

from __future__ import annotations

import json

import pytest

from tests.evaluation.tiny_run import tiny_model_dir, tiny_run_dir

pytest.importorskip("lm_eval", reason="lm-eval-harness is an optional extra: pip install -e \".[lmeval]\"")
pytestmark = pytest.mark.slow

QUESTIONS = [  # every word is in the tiny tokenizer's vocabulary; answers as indices and as letters
    {"question": "What is the capital of France", "choices": ["Paris", "London", "Rome"], "answer": 0},
    {"question": "What is two plus two", "choices": ["three", "four", "five"], "answer": "B"},
    {"question": "What color is the sky", "choices": ["green", "blue", "red", "a red sky"], "answer": "b"},
    {"question": "What is two plus three", "choices": ["five", "four"], "answer": 0},
    {"question": "hello", "choices": ["world", "a world", "it and a world"], "answer": 0},
    {"question": "What is the color of it", "choices": ["red", "blue sky", "green and blue"], "answer": 2},
    {"question": "What is a capital", "choices": ["Rome", "Paris and London", "it"], "answer": "A"},
    {"question": "two plus two equals", "choices": ["four", "five", "three", "two"], "answer": 0},
]


@pytest.fixture(scope="module")
def run_and_questions(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    base = tiny_model_dir(root / "base")
    run, _ = tiny_run_dir(root / "run", base, "flora", [4, 2, 1])
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return run, questions


def test_lm_eval_on_a_run_folder_equals_fedloras_scorer(run_and_questions, tmp_path, capsys):
    from fedlora.cli import main

    run, questions = run_and_questions
    assert main(["eval", str(run), "--lm-eval", str(questions), "--json", str(tmp_path / "out.json")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["questions"] == len(QUESTIONS) and set(result["lm_eval"]) == {"accuracy", "accuracy_norm", "accuracy_bytes"}
    for key in ("accuracy", "accuracy_norm", "accuracy_bytes"):
        assert result["lm_eval"][key] == result["fedlora"][key], key
    assert result["agree"]["max_loglik_gap"] < 1e-4  # float32 forward passes of the same weights, merged two ways
    picks = [max(range(len(ll)), key=ll.__getitem__) for ll in result["lm_eval_logliks"]]
    assert picks == result["fedlora"]["picks"]  # question by question, not only the means
    assert 0 < len({round(v, 6) for ll in result["lm_eval_logliks"] for v in ll})  # lm-eval scored every choice
    assert sum(len(q["choices"]) for q in QUESTIONS) == sum(len(ll) for ll in result["lm_eval_logliks"])
    assert "the same accuracies" in printed and "lm-eval-harness" in printed


def test_lm_eval_reads_a_users_task_yaml_over_a_local_jsonl(run_and_questions, tmp_path, monkeypatch, capfd):
    """The documented task YAML (``dataset_path: json`` with ``data_files``), passed as a file, gives the same numbers;
    run outside a git checkout, as after a pip install, nothing complains about git."""
    import yaml

    from fedlora.evaluation.lm_eval_task import run_lm_eval, write_task

    run, questions = run_and_questions
    monkeypatch.chdir(tmp_path)
    task = write_task(questions, tmp_path / "tasks", name="my_local_mmlu")
    spec = yaml.safe_load(task.read_text())
    assert spec["dataset_path"] == "json" and spec["dataset_kwargs"]["data_files"]["test"] == str(questions.resolve())
    result = run_lm_eval(run, task)
    assert result["task"] == "my_local_mmlu" and all(result["agree"][k] for k in ("accuracy", "accuracy_norm", "accuracy_bytes"))
    limited = run_lm_eval(run, task, limit=3)
    assert limited["questions"] == 3 and "fedlora" not in limited
    assert "not a git repository" not in capfd.readouterr().err


def test_lm_eval_errors_are_one_line(run_and_questions, tmp_path, capsys):
    from fedlora.cli import main

    run, _ = run_and_questions
    bad = tmp_path / "task.yaml"
    bad.write_text("dataset_path: json\n")
    for task, says in ((tmp_path / "missing.jsonl", "--lm-eval: file not found"), (bad, "names no `task`")):
        assert main(["eval", str(run), "--lm-eval", str(task)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err


def test_a_users_own_task_runs_alone_and_is_compared_only_when_it_asks_fedloras_questions(run_and_questions, tmp_path, capsys):
    """A .yml among other task files (one of the same name) is the one run; a changed prompt is scored by lm-eval
    but not set beside fedlora's scorer, which asks other questions; a data file that is not there is one line."""
    import yaml

    from fedlora.cli import main
    from fedlora.evaluation.lm_eval_task import run_lm_eval, task_spec

    run, questions = run_and_questions
    spec = task_spec(questions, name="mine")
    (tmp_path / "decoy.yaml").write_text(yaml.safe_dump({**spec, "doc_to_text": "{{question}}?"}))  # same task name, other prompt
    mine = tmp_path / "mine.yml"
    mine.write_text(yaml.safe_dump(spec))
    result = run_lm_eval(run, mine)
    assert result["task"] == "mine" and all(result["agree"][k] for k in ("accuracy", "accuracy_norm", "accuracy_bytes"))
    other = run_lm_eval(run, tmp_path / "decoy.yaml")
    assert other["questions"] == len(QUESTIONS) and "fedlora" not in other and "agree" not in other
    assert other["lm_eval_logliks"] != result["lm_eval_logliks"]  # the decoy's prompt was what ran
    gone = tmp_path / "gone.yaml"
    gone.write_text(yaml.safe_dump(task_spec(tmp_path / "nowhere.jsonl", name="gone")))
    capsys.readouterr()  # what the runs above printed
    assert main(["eval", str(run), "--lm-eval", str(gone)]) == 2
    err = capsys.readouterr().err
    assert "nowhere.jsonl, which is not a file here" in err and err.count("\n") == 1
