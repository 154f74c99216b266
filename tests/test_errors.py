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
    (["data.max_examples=2"], ["federation.num_clients", "3 clients", "accepted: "]),  # fewer examples than clients
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
