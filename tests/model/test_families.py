"""fedlora on every model family it claims: Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 (text), Phi-3.

Each family is a tiny random-weight model built with transformers and saved as a local folder
with a BPE tokenizer and a chat template in the family's style (tests/tiny_folder.py). A real
`fedlora run` (1 round, 1 local step) trains on it, `fedlora export` writes the PEFT adapter, and
`PeftModel.from_pretrained` on the base folder must give what fedlora's own global model gives:
the loss the run measured in its last evaluation (on the same examples) and the logits of the
model `fedlora eval RUN_DIR` builds (the update folded into the weights, no PEFT forward). Every
method of the set below runs on Phi-3 (fused qkv_proj / gate_up_proj); each other family runs one
of them, so every method meets a second family and flora a third (about 3 s a run on 2 cores).
``lora.target_modules=all-linear`` (flexlora) runs on a tied family (Gemma 3, with the merged
export) and on the fused one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.data.example import Example
from fedlora.data.formatting import IGNORE_INDEX, tokenize_examples
from fedlora.evaluation.models import load_for_eval
from fedlora.federation.experiment import load_source
from fedlora.model.adapters import AdapterHost
from fedlora.model.loading import target_layer_shapes
from fedlora.methods import REGISTRY
from fedlora.train.tasks import CausalLM

from tests.conftest import rel_err
from tests.tiny_folder import FAMILIES, FUSED, TIED, missing_class, save_tiny_model

ROOT = Path(__file__).resolve().parents[2]

FAST = ["federation.rounds=1", "train.local_steps=1", "train.lr=0.05", "train.max_length=48", "data.max_examples=24",
        "eval.max_examples=4", "federation.num_clients=2"]
METHODS = sorted(REGISTRY)
OURS = [m for m in METHODS if REGISTRY[m].__module__.startswith("fedlora.")]
CASES = [(f, m) for f in FAMILIES for m in OURS] + [(FAMILIES[0], m) for m in METHODS if m not in OURS]  # outside methods: one family
END_OF_TURN = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>\n", "qwen3": "<|im_end|>\n", "mistral": "<eos>", "gemma2": "<end_of_turn>\n",
               "gemma3": "<end_of_turn>\n", "phi3": "<|end|>\n"}


def targets_of(family: str) -> list[str]:
    return ["qkv_proj"] if family in FUSED else ["q_proj", "v_proj"]


class Folders(dict):
    """family → its saved folder, built on first use; a family whose class this transformers lacks is skipped, saying so."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Path:
        if reason := missing_class(family):
            pytest.skip(reason)
        self[family] = save_tiny_model(self.root / family, family)
        return self[family]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Folders:
    return Folders(tmp_path_factory.mktemp("families"))


def fedlora_run(base: Path, out: Path, method: str, targets: list[str] | str) -> Path:
    ranks = "lora.rank=2" if REGISTRY[method].ranks == "one" else "lora.ranks=[2,1]"
    names = targets if isinstance(targets, str) else "[" + ",".join(targets) + "]"
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), f"model.path={base}", f"federation.method={method}", f"output.dir={out}",
            f"lora.target_modules={names}", ranks, *FAST]
    assert main(args) == 0
    return out


def fedlora_export(run: Path, out: Path, personal: bool) -> dict:
    """`fedlora export` exactly: at the rank of the run's own final adapter (a merging method would truncate to 1 % by default)."""
    final = run / "final" / ("client-0" if personal else "")
    rank = json.loads((final / "adapter_config.json").read_text())["r"]
    assert main(["export", str(run), "--out", str(out), "--rank", str(rank), *(["--client", "0"] if personal else [])]) == 0
    e = json.loads((out / "fedlora_export.json").read_text())
    assert e["rank"] == e["exact_rank"] == rank and e["max_layer_error"] == 0.0
    return e


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def check_export(base: Path, run: Path, exported: Path, personal: bool) -> PeftModel:
    """The exported adapter under plain PEFT gives the run's last measured loss and fedlora's global model's logits."""
    cfg = load_config(run / "config.yaml")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    split = json.loads((run / "partition.json").read_text())
    where = (lambda e: e["eval"]["clients"]["0"]["loss"]) if personal else (lambda e: e["eval"]["global"]["loss"])
    ours = load_for_eval(run, client=0 if personal else None, device="cpu")  # as `fedlora eval RUN_DIR` builds it
    kept = tokenize_examples(load_source(cfg), ours.tokenizer, cfg.train.max_length, train_on_inputs=cfg.train.train_on_inputs)
    examples = [kept[i] for i in (split["clients"][0]["test_indices"] if personal else split["global_test_indices"])]  # the run's split
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).eval(), exported).eval()
    got = CausalLM().evaluate(peft_model, examples, cfg.eval.batch_size, ours.tokenizer.pad_token_id, torch.device("cpu"))["loss"]
    assert got == pytest.approx(where(lines[-1]), rel=1e-6)  # what the run measured on its own global model
    assert abs(where(lines[-1]) - where(lines[0])) > 2 * 1e-6 * where(lines[0])  # the update moved it beyond that tolerance: the base alone fails
    ids = torch.tensor([examples[0].input_ids])  # a real prompt, chat-template markers included
    assert rel_err(logits(peft_model, ids), logits(ours.model, ids)) < 1e-5
    assert rel_err(logits(AutoModelForCausalLM.from_pretrained(base).eval(), ids), logits(ours.model, ids)) > 1e-2
    tied = ours.model.get_output_embeddings().weight.data_ptr() == ours.model.get_input_embeddings().weight.data_ptr()
    assert tied == (base.name in TIED)  # fedlora's loading keeps the family's tying (or its absence)
    return peft_model


@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_run_export_and_reload_with_peft(folders, tmp_path, family, method):
    base, personal = folders[family], REGISTRY[method].personal  # no global model: client 0's own model is exported and checked
    run = fedlora_run(base, tmp_path / "run", method, targets_of(family))
    fedlora_export(run, tmp_path / "adapter", personal)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == targets_of(family) and config["base_model_name_or_path"] == base.name  # portable
    peft_model = check_export(base, run, tmp_path / "adapter", personal)
    layers = AdapterHost.lora_layers(peft_model)
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in targets_of(family))
    if family in FUSED:  # the fused projection's update reaches all three of q, k and v (rows 0:32, 32:48, 48:64)
        for layer in layers.values():
            delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            assert delta.shape == (64, 32) and all(float(delta[a:b].norm()) > 0 for a, b in ((0, 32), (32, 48), (48, 64)))


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_all_linear_is_every_linear_but_the_output_head(folders, tmp_path, family):
    from peft import LoraConfig, get_peft_model

    base = folders[family]
    model = AutoModelForCausalLM.from_pretrained(base)
    shapes = target_layer_shapes(model, ["all-linear"])
    peft_own = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=1, target_modules="all-linear"))
    assert sorted(shapes) == sorted(AdapterHost.lora_layers(peft_own))  # PEFT's own resolution of the shorthand
    per_layer = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family in FUSED else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    mlp = {"gate_proj", "up_proj", "down_proj", "gate_up_proj"}
    assert sorted(shapes) == sorted(f"model.layers.{i}.{'mlp' if t in mlp else 'self_attn'}.{t}" for i in range(2) for t in per_layer)
    assert "lm_head" not in shapes
    run = fedlora_run(base, tmp_path / "run", "flexlora", "all-linear")
    assert load_config(run / "config.yaml").lora.target_modules == ["all-linear"]
    fedlora_export(run, tmp_path / "adapter", personal=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(shapes)  # concrete module names, not the shorthand
    peft_model = check_export(base, run, tmp_path / "adapter", personal=False)
    assert sorted(AdapterHost.lora_layers(peft_model)) == sorted(shapes)
    if family in TIED:  # the merged export keeps lm_head tied to the (unadapted) embedding
        assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--merged"]) == 0
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
        ids = torch.tensor([[5, 9, 11, 7, 30, 14, 6]])
        assert rel_err(logits(merged, ids), logits(peft_model, ids)) < 1e-5


def test_all_linear_stands_alone(folders, tmp_path, capsys):
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), f"model.path={folders['llama']}", f"output.dir={tmp_path / 'run'}", "lora.target_modules=[all-linear,q_proj]"]
    assert main(args) == 2
    assert "lora.target_modules: 'all-linear' (every Linear layer but the output head) stands alone" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_masks_the_prompt_and_trains_the_turn(folders, family):
    """fedlora's tokenization on each family's template: the prompt up to the assistant header is masked, the answer and its end of turn are labels."""
    tokenizer = AutoTokenizer.from_pretrained(folders[family])
    example = Example(prompt="What is your favourite book?", response="I like Don Quixote.", category="books")
    (t,) = tokenize_examples([example], tokenizer, 96)
    masked = sum(label == IGNORE_INDEX for label in t.labels)
    assert t.labels[:masked] == [IGNORE_INDEX] * masked and t.labels[masked:] == t.input_ids[masked:]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(t.input_ids[:masked]) == prompt and example.prompt in prompt
    assert tokenizer.decode(t.input_ids[masked:]) == example.response + END_OF_TURN[family]
