"""A tiny random Llama saved as a real HF folder (word-level tokenizer), and a run folder on it.

The run folder is what `fedlora run` leaves (config.yaml, metrics.jsonl, final/) with a method
aggregated on random float64 updates instead of training: export and eval logic in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedlora.config import build_config, to_yaml
from fedlora.methods import Setup, build_method
from fedlora.model.adapters import AdapterHost
from fedlora.model.export import save_adapter
from fedlora.model.loading import target_layer_shapes
from fedlora.ops.weights import data_weights

from tests.conftest import random_update

TARGETS = ["q_proj", "v_proj"]
WORDS = (
    "Question: Answer: What is the capital of France Paris London Rome two plus equals four five three "
    "color sky blue green red hello world a an it and"
).split()


def word_tokenizer():
    """A fast tokenizer splitting on whitespace over WORDS (no chat template): ids by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model_dir(folder: Path) -> Path:
    """save_pretrained of a 2-layer random Llama (float32) and the word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )
    model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_config(root: Path, method: str = "flora", rounds: int = 1) -> Path:
    """A YAML config for `fedlora run`/`compare` on a tiny random Llama in ``root``: chatterbot, 3 clients of ranks 2, 1, 1."""
    import yaml

    cfg = {
        "model": {"path": str(tiny_model_dir(root / "tiny-llama"))},
        "lora": {"ranks": [2, 1, 1], "scale": 2.0, "target_modules": TARGETS},
        "data": {"source": "chatterbot", "partition": "dirichlet", "alpha": 0.5, "max_examples": 60},
        "federation": {"method": method, "rounds": rounds, "num_clients": 3},
        "train": {"local_steps": 1, "batch_size": 4, "micro_batch_size": 4, "max_length": 48},
        "eval": {"batch_size": 8, "max_examples": 6},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_run_dir(folder: Path, base: Path, method: str, ranks: list[int], rounds: int = 2, seed: int = 0) -> tuple[Path, dict]:
    """A run folder whose final/ is ``method`` aggregated over random updates; returns it and the global
    delta (client 0's for a personal method)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    shapes = target_layer_shapes(model, TARGETS)
    clients = dict(enumerate(ranks))
    scale = 2.0
    m = build_method(method, Setup(shapes, clients, {k: scale for k in clients}, seed=seed, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    for rnd in range(1, rounds + 1):
        updates = []
        for k in clients:
            plan = m.plan(k, rnd)
            u = random_update(k, shapes, plan.rank, scale, 3 + k, gen)
            for f in u.factors.values():
                f.B.mul_(0.05)
            u.meta.update(plan.meta)
            updates.append(u)
        m.aggregate(updates, data_weights([u.num_examples for u in updates]), rnd)
    folder.mkdir(parents=True)
    cfg = build_config({
        "model": {"path": str(base)}, "lora": {"ranks": ranks, "scale": scale, "target_modules": TARGETS},
        "federation": {"method": method, "num_clients": len(ranks), "rounds": rounds},
    }, [])
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / "metrics.jsonl").write_text(json.dumps({"round": 0, "method": method, "clients": [], "eval": {"global": {"loss": 1.0}}}) + "\n")
    host = AdapterHost(model, list(shapes))
    if m.personal:  # local: one adapter per client, as fedlora run writes them
        for k in clients:
            save_adapter(host, m.client_delta(k), TARGETS, folder / "final" / f"client-{k}", str(base))
        return folder, m.client_delta(0)
    save_adapter(host, m.global_delta(), TARGETS, folder / "final", str(base))
    return folder, m.global_delta()
