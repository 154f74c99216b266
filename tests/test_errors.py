"""Every bad input to `fedlora run` is one line naming the setting, the value and what is accepted; no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.cli import main
from tests.tiny_folder import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
EMPTY_TRAIN = ["data.partition=quantity", "data.alpha=0.05", "data.min_size=1", "data.max_examples=12", "data.test_fraction=0.6"]
"""A split that leaves clients 1 and 2 one example each, which becomes their test split."""

CASES = [
    # (overrides, what the line must say: the setting, the value, what is accepted)
    (["federation.rounds=0"], ["federation.rounds", "got 0", "greater than or equal to 1"]),
    (["federation.method=nope"], ["federation.method", "'nope'", "accepted: ", "flora"]),
    (["federation.nope=1"], ["federation.nope", "unknown setting", "accepted in federation: method"]),
    (["lora.ranks=[4,2]"], ["lora.ranks", "[4, 2]", "exactly 3 ranks"]),
    (["lora.rank=0"], ["lora.rank", "got 0", "positive"]),
    (["data.partition=zipf"], ["data.partition", "'zipf'", "'iid'"]),
    (["train.lr=fast"], ["train.lr", "'fast'", "valid number"]),
    (["federation.max_update_norm=-1"], ["federation.max_update_norm", "got -1", "greater than 0"]),
    (["federation.min_clients=5"], ["federation.min_clients", "5", "federation.num_clients=3"]),
    (["federation.options.weights=heavy"], ["federation.options.weights", "'heavy'", "accepted: data, uniform"]),
    (["federation.rounds"], ["override", "'federation.rounds'", "key=value"]),
    (["model.path=/nonexistent/model"], ["model.path", "/nonexistent/model", "accepted: "]),
    (["data.source=/nonexistent/data.jsonl"], ["data.source", "/nonexistent/data.jsonl"]),
    (["lora.target_modules=[q_proj,nope_proj]"], ["lora.target_modules", "nope_proj", "found: ['q_proj']"]),
    (["lora.rank=20"], ["lora.ranks", "rank 20", "accepted: 1..16"]),  # v_proj of the tiny model is 16×32
    (["data.max_examples=2"], ["federation.num_clients", "3 clients", "accepted: a smaller data.min_size, or more data"]),  # fewer examples than clients
    (["train.max_length=8"], ["train.max_length", "8 tokens leaves 0 of", "no answer token", "accepted: a larger train.max_length"]),
    (EMPTY_TRAIN, ["data.test_fraction", "0.6", "no training example", "accepted: "]),  # an empty partition
    # values that would make a run meaningless
    (["train.lr=inf"], ["train.lr", "finite number", "'inf'"]),
    (["train.lr=1e30"], ["train.lr", "less than or equal to 1", "'1e30'"]),
    (["lora.scale=-1"], ["lora.scale", "greater than 0", "-1.0"]),
    (["lora.scale=0"], ["lora.scale", "greater than 0", "0 trains nothing", "0.0"]),
    (["lora.scale=.nan"], ["lora.scale", "finite", "nan"]),
    (["lora.scale=[1,0,2]"], ["lora.scale", "greater than 0", "[1.0, 0.0, 2.0]"]),
    (["train.max_length=100000"], ["train.max_length", "100000", "context of 256 tokens", "accepted: 8..256"]),
    *([(["model.device=cuda"], ["model.device", "'cuda'", "no CUDA device", "accepted here: auto, cpu"])] if not torch.cuda.is_available() else []),
    (["seed=-1"], ["seed", "greater than or equal to 0", "-1"]),
    (["seed=99999999999999999999999"], ["seed", "less than 9223372036854775808", "99999999999999999999999"]),
    (["train.precision=half"], ["train.precision", "'half'", "'float32'", "'bfloat16'", "'auto'"]),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.mark.parametrize(("overrides", "says"), CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_bad_input_is_one_line_with_setting_value_and_accepted(model_dir, tmp_path, capfd, overrides, says):
    model = [] if any(o.startswith("model.path=") for o in overrides) else [f"model.path={model_dir}"]
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), *model, f"output.dir={tmp_path / 'run'}", "output.save_final=false", *overrides]
    assert main(args) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # other lines: a model-loading progress bar
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in says:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("kind", ["latin-1 data", "utf-16 data", "binary config", "bad save_to_disk folder", "output.dir under a file",
                                  "model config not JSON", "model without weights", "model without tokenizer"])
def test_files_in_another_encoding_or_broken_are_one_line(model_dir, tmp_path, capfd, kind):
    config = ROOT / "configs" / "tiny.yaml"
    extra = []
    if kind == "latin-1 data":
        (tmp_path / "d.jsonl").write_bytes('{"instruction": "café?", "output": "oui"}\n'.encode("latin-1") * 30)
        extra, says = [f"data.source={tmp_path / 'd.jsonl'}"], ["data.source", "not UTF-8 text", "accepted: UTF-8"]
    elif kind == "utf-16 data":
        (tmp_path / "d.jsonl").write_text('{"instruction": "hi", "output": "yo"}\n' * 30, encoding="utf-16")
        extra, says = [f"data.source={tmp_path / 'd.jsonl'}"], ["data.source", "not UTF-8 text"]
    elif kind == "binary config":
        config = tmp_path / "c.yaml"
        config.write_bytes(bytes(range(256)))
        says = ["config:", "not UTF-8 text", "accepted: a YAML file"]
    elif kind == "bad save_to_disk folder":
        folder = tmp_path / "ds"
        folder.mkdir()
        (folder / "dataset_info.json").write_text("{not json")
        (folder / "state.json").write_text("{not json")
        extra, says = [f"data.source={folder}"], ["data.source", "cannot be read"]
    elif kind == "output.dir under a file":
        (tmp_path / "file").write_text("x")
        extra, says = [f"output.dir={tmp_path / 'file' / 'run'}"], ["output.dir", "cannot create", "accepted: a folder path"]
    else:  # a model folder missing what loading needs
        bad = tmp_path / "model"
        bad.mkdir()
        (bad / "config.json").write_text("{oops" if kind == "model config not JSON" else '{"model_type": "llama"}')
        if kind == "model without tokenizer":
            (bad / "model.safetensors").write_bytes(b"")
        what = {"model config not JSON": "is not JSON", "model without weights": "holds no weights", "model without tokenizer": "holds no tokenizer"}[kind]
        extra, says = [f"model.path={bad}"], ["model.path", what, "accepted: a folder written by save_pretrained"]
    args = ["run", str(config), f"model.path={model_dir}", f"output.dir={tmp_path / 'run'}", *extra]
    assert main(args) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(part in lines[0] for part in says), lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides", [["federation.method=nope"], ["federation.method=fedit"], ["federation.options.nope=1"]])
def test_method_errors_come_before_transformers_and_the_data_load(tmp_path, overrides):
    """Checked in a fresh interpreter: the error line is printed while transformers is still not imported."""
    import subprocess
    import sys

    code = (
        "import sys; from fedlora.cli import main; "
        f"rc = main(['run', {str(ROOT / 'configs' / 'tiny.yaml')!r}, 'output.dir={tmp_path / 'run'}', *{overrides!r}]); "
        "print('rc', rc, 'transformers' in sys.modules, 'datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["rc", "2", "False", "False"], out.stdout + out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("error:")], out.stderr
    assert not (tmp_path / "run").exists()


def test_clients_without_a_test_example_are_named_in_a_warning_and_scored_null(model_dir, tmp_path, caplog):
    import json

    args = ["run", str(ROOT / "configs" / "tiny.yaml"), f"model.path={model_dir}", f"output.dir={tmp_path / 'run'}", "output.save_final=false",
            "data.test_fraction=0", "federation.rounds=1", "train.local_steps=1", "data.max_examples=30"]
    with caplog.at_level("WARNING", logger="fedlora"):
        assert main(args) == 0
    assert any("clients 0, 1, 2 hold no test example" in m and "data.test_fraction=0" in m for m in caplog.messages), caplog.messages
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["eval"]["clients"]["0"]["loss"] is None and first["eval"]["global"]["loss"] > 0
