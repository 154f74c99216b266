"""fedlora eval on a tiny run folder: the held-out loss is the global model's, whichever folder holds it."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.cli import main
from fedlora.data import DataError, load_examples, tokenize_examples
from fedlora.evaluation.eval_run import run_eval
from fedlora.evaluation.export_run import export_run
from fedlora.model.adapters import AdapterHost
from fedlora.model.loading import target_layer_shapes
from fedlora.train.tasks import CausalLM

from tests.evaluation.tiny_run import TARGETS, tiny_model_dir, tiny_run_dir

RECORDS = [
    {"instruction": "What is the capital of France", "output": "Paris"},
    {"instruction": "What is two plus two", "output": "four"},
    {"instruction": "What color is the sky", "output": "blue sky"},
    {"instruction": "hello", "output": "hello world"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = tiny_model_dir(root / "base")
    run, delta = tiny_run_dir(root / "run", base, "fedplora", [2, 1])
    data = root / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return base, run, delta, data


def test_heldout_loss_is_the_global_models(folders):
    base, run, delta, data = folders
    got = run_eval(run, data, generate=2, max_new_tokens=4, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    host = AdapterHost(model, list(target_layer_shapes(model, TARGETS)))
    host.set_delta(delta)
    tokenized = tokenize_examples(load_examples(str(data)), tok, 256)
    expected = CausalLM().evaluate(host.model, tokenized, 8, tok.pad_token_id, torch.device("cpu"))["loss"]
    h = got["heldout"]
    assert h["loss"] == pytest.approx(expected, rel=1e-6) and h["perplexity"] == pytest.approx(math.exp(expected), rel=1e-12)
    assert h["examples"] == 4 and h["answer_tokens"] == sum(CausalLM().targets(t) for t in tokenized)
    assert (h["max_length"], h["max_length_from"]) == (256, "the run's train.max_length")  # said, so two models compare like with like
    assert run_eval(base, data, generate=0, max_length=64, device="cpu")["heldout"]["max_length_from"] == "--max-length"
    assert [g["prompt"] for g in got["generations"]] == [RECORDS[0]["instruction"], RECORDS[1]["instruction"]]
    assert all(isinstance(g["output"], str) for g in got["generations"])


def test_exported_adapter_and_merged_folder_score_the_same(folders, tmp_path):
    _, run, _, data = folders
    export_run(run, tmp_path / "adapter")
    export_run(run, tmp_path / "merged", merged=True)
    losses = [run_eval(p, data, generate=0, device="cpu")["heldout"]["loss"] for p in (run, tmp_path / "adapter", tmp_path / "merged")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_cli_multiple_choice_and_json(folders, tmp_path, capsys):
    _, run, _, _ = folders
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": ["Paris", "four", "blue"], "answer": i}) + "\n" for i, q in enumerate(["a", "b", "c"])))
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", str(mc), "--generate", "1", "--max-new-tokens", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["multiple_choice"]["questions"] == 3 and len(result["multiple_choice"]["picks"]) == 3
    assert f"accuracy {result['multiple_choice']['accuracy']:.4f}" in capsys.readouterr().out


def test_user_errors_are_one_line(folders, tmp_path, capsys):
    _, run, _, _ = folders
    cases = [
        ([str(run)], "--data: nothing to evaluate"),
        ([str(run), "--data", str(tmp_path / "none.jsonl")], "--data: file not found"),
        ([str(tmp_path), "--prompt", "hi"], "is neither a run folder, an adapter nor a model folder"),
    ]
    for argv, message in cases:
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err.replace("\n", " ") and "Traceback" not in err
    with pytest.raises(DataError, match="--generate"):
        run_eval(run, prompts=["hi"], generate=-1)
