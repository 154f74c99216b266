"""Everything a run needs, built and checked before the first round: data, model, method."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.config import Config, ConfigError
from fedlora.data import DataError, TokenizeStats, label_names_of, load_examples, partition, tokenize_examples, tokenize_for_classification, train_test_split
from fedlora.methods import Method, Setup, build_method
from fedlora.model.adapters import AdapterHost
from fedlora.model.loading import ALL_LINEAR, head_modules, load_causal_lm, load_classifier, meta_layer_shapes, pick_device, pick_dtype, resolve_model_dir
from fedlora.train.adalora import AdaLoraTrainer
from fedlora.train.local import LocalTrainer
from fedlora.train.tasks import CausalLM, Classification

log = logging.getLogger(__name__)


@dataclass
class ClientData:
    id: int
    train: list[Any]  # TokenizedExample or ClassifiedExample
    test: list[Any]


@dataclass
class Experiment:
    cfg: Config
    model_dir: Path
    device: torch.device
    host: AdapterHost
    tokenizer: Any
    clients: list[ClientData]
    global_test: list[Any]
    method: Method
    trainer: LocalTrainer
    partition_info: dict[str, Any]


def check_model(cfg: Config) -> tuple[Path, dict[str, tuple[int, int]]]:
    """The model folder exists, has the target layers, and every rank fits them."""
    model_dir = resolve_model_dir(cfg.model.path, cfg.model.task)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model.path: no HF model folder (config.json) at {model_dir} (accepted: a local folder saved with save_pretrained, or empty for the embedded SmolLM2)")
    meta = check_model_folder(model_dir)
    shapes = meta_layer_shapes(model_dir, cfg.lora.target_modules, cfg.model.task)
    if not shapes:
        raise ConfigError(f"lora.target_modules: no Linear layer named {cfg.lora.target_modules} in {model_dir.name} (accepted: e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    found = {n.rsplit(".", 1)[-1] for n in shapes}
    if missing := [m for m in cfg.lora.target_modules if m not in found and m != ALL_LINEAR]:
        raise ConfigError(f"lora.target_modules: {missing} not found in {model_dir.name} (found: {sorted(found)})")
    context = meta.get("max_position_embeddings")  # the model's longest sequence, when its config says
    if isinstance(context, int) and context > 0 and cfg.train.max_length > context:
        raise ConfigError(f"train.max_length: {cfg.train.max_length} exceeds the model's context of {context} tokens (accepted: 8..{context})")
    setup = Setup(shapes, dict(enumerate(cfg.client_ranks())), {}, rank_patterns=cfg.client_rank_patterns())
    for key in cfg.lora.rank_patterns:
        if not any(n == key or n.endswith("." + key) for n in shapes):
            raise ConfigError(f"lora.rank_patterns.{key}: matches no target layer (accepted: a suffix of one of {sorted(found)})")
    for name, (d_out, d_in) in shapes.items():
        for k in setup.ranks:
            if (r := setup.rank_of(k, name)) > min(d_out, d_in):
                where = "lora.ranks" if r == setup.ranks[k] else "lora.rank_patterns"
                raise ConfigError(f"{where}: rank {r} exceeds layer {name} ({d_out}×{d_in}) (accepted: 1..{min(d_out, d_in)})")
    return model_dir, shapes


def check_model_folder(model_dir: Path) -> dict[str, Any]:
    """A config.json that names its ``model_type``, weights and a tokenizer: what loading needs, checked before it; the config."""
    import json

    accepted = "(accepted: a folder written by save_pretrained of a model and its tokenizer)"
    try:
        meta = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise ConfigError(f"model.path: {model_dir}/config.json is not JSON {accepted}") from None
    if not isinstance(meta, dict) or not meta.get("model_type"):
        raise ConfigError(f"model.path: {model_dir}/config.json names no model_type {accepted}")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((model_dir / w).is_file() for w in weights) and not list(model_dir.glob("*.safetensors")):
        raise ConfigError(f"model.path: {model_dir} holds no weights ({', '.join(weights[:3])}) {accepted}")
    tokenizer = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
    if not any((model_dir / t).is_file() for t in tokenizer):
        raise ConfigError(f"model.path: {model_dir} holds no tokenizer ({', '.join(tokenizer)}) {accepted}")
    return meta


def test_seed(cfg: Config) -> int:
    """The seed of the data's subset and the global test split: ``data.global_test_seed``, else the run's."""
    return cfg.seed if cfg.data.global_test_seed is None else cfg.data.global_test_seed


def load_source(cfg: Config) -> list:
    d = cfg.data
    return load_examples(
        d.source, language=d.language, max_examples=d.max_examples, seed=test_seed(cfg), by=d.by, text_field=d.text_field, label_field=d.label_field
    )


def prepare(cfg: Config) -> Experiment:
    model_dir, shapes = check_model(cfg)
    setup = Setup(
        layers=shapes,
        ranks=dict(enumerate(cfg.client_ranks())),
        scales=dict(enumerate(cfg.client_scales())),
        seed=cfg.seed,
        options=cfg.federation.options,
        rank_patterns=cfg.client_rank_patterns(),
    )
    method = build_method(cfg.federation.method, setup)  # method errors before the data and the model load
    device = pick_device(cfg.model.device)
    examples = load_source(cfg)
    dtype = pick_dtype(cfg.model.dtype, device)
    stats = TokenizeStats()
    length = cfg.train.max_length
    tokenized: list[Any]
    task: Classification | CausalLM
    if cfg.model.task == "classification":
        labels = label_names_of(examples)
        model, tokenizer = load_classifier(model_dir, len(labels), device, dtype, cfg.seed)
        tokenized = tokenize_for_classification(examples, tokenizer, length, labels, stats=stats)
        task, heads = Classification(), head_modules(model)
    else:
        model, tokenizer = load_causal_lm(model_dir, device, dtype)
        tokenized = tokenize_examples(examples, tokenizer, length, train_on_inputs=cfg.train.train_on_inputs, stats=stats)
        task, heads = CausalLM(), []
    dropped = set(stats.dropped_indices)
    examples = [e for i, e in enumerate(examples) if i not in dropped]  # prompts longer than max_length
    log.info(stats.summary(length))
    if dropped and len(examples) < cfg.federation.num_clients * cfg.data.min_size:
        raise ConfigError(
            f"train.max_length: {length} tokens leaves {len(examples)} of {stats.total} examples ({len(dropped)} have no answer token "
            f"within it) (accepted: a larger train.max_length)"
        )
    clients, global_test, info = split_clients(cfg, examples, tokenized)
    if empty := [c.id for c in clients if not c.train]:
        raise DataError(
            f"data.test_fraction: {cfg.data.test_fraction} leaves client {empty[0]} ({len(empty)} in all) no training example "
            f"(accepted: a smaller data.test_fraction, a larger data.min_size, or another data.partition)"
        )
    if untested := [c.id for c in clients if not c.test]:
        log.warning("client%s %s hold%s no test example (data.test_fraction=%g of too few): %s test loss is NaN, null in metrics.jsonl "
                    "(for one: a larger data.test_fraction or data.min_size)", "s" if len(untested) > 1 else "",
                    ", ".join(map(str, untested)), "" if len(untested) > 1 else "s", cfg.data.test_fraction, "their" if len(untested) > 1 else "its")
    if not global_test:
        log.warning("the global test split is empty (data.global_test_fraction=%g): the global loss is NaN (for one: a larger "
                    "data.global_test_fraction)", cfg.data.global_test_fraction)
    info["tokenize"] = {"total": stats.total, "kept": stats.kept, "truncated": stats.truncated, "dropped": stats.dropped}
    if cfg.model.task == "classification":
        info["labels"] = labels
    host = AdapterHost(model, list(shapes), head_modules=heads)
    args = (host, cfg.train, cfg.lora.target_modules, tokenizer.pad_token_id, device, cfg.seed, cfg.lora.dropout)
    if cfg.lora.adapter == "adalora":
        trainer: LocalTrainer = AdaLoraTrainer(*args, task=task, target=cfg.lora.adalora_target, orth_reg=cfg.lora.adalora_orth_reg)
    else:
        trainer = LocalTrainer(*args, task=task)
    matmuls = str(trainer.compute_dtype or dtype).removeprefix("torch.")
    log.info("model %s on %s (weights %s, matmuls %s: train.precision=%s); %d examples over %d clients", model_dir, device,
             str(dtype).removeprefix("torch."), matmuls, cfg.train.precision, len(tokenized), len(clients))
    return Experiment(cfg, model_dir, device, host, tokenizer, clients, global_test, method, trainer, info)


def split_indices(cfg: Config, categories: list[str]) -> dict[str, Any]:
    """Global test split first, then the partition, then each client's own train/test split (indices only)."""
    d = cfg.data
    pool, global_idx = train_test_split(range(len(categories)), d.global_test_fraction, test_seed(cfg))
    parts = partition([categories[i] for i in pool], cfg.federation.num_clients, d.partition, alpha=d.alpha, seed=cfg.seed,
                      min_size=d.min_size, classes_per_client=d.classes_per_client)
    cap = cfg.eval.max_examples
    info_clients = []
    for k, part in enumerate(parts):
        idx = [pool[j] for j in part]
        train_idx, test_idx = train_test_split(idx, d.test_fraction, cfg.seed + k + 1)
        info_clients.append({
            "id": k, "rank": cfg.client_ranks()[k], "train": len(train_idx), "test": len(_cap(test_idx, cap, cfg.seed + k)),
            "categories": dict(Counter(categories[i] for i in idx).most_common()),
            "train_indices": train_idx, "test_indices": _cap(test_idx, cap, cfg.seed + k), "all_indices": sorted(idx),
        })
    held_out = len(global_idx)
    global_idx = _cap(global_idx, cap, test_seed(cfg))
    return {
        "source": d.source, "partition": d.partition, "alpha": d.alpha, "by": d.by, "num_examples": len(categories),
        "global_test": len(global_idx), "global_held_out": held_out, "global_test_indices": global_idx, "clients": info_clients,
    }


def split_clients(cfg: Config, examples: list, tokenized: list) -> tuple[list[ClientData], list, dict[str, Any]]:
    """The clients' train/test data and the global test split, as ``split_indices`` deals them."""
    info = split_indices(cfg, [e.category for e in examples])
    clients = [ClientData(c["id"], [tokenized[i] for i in c["train_indices"]], [tokenized[i] for i in c["test_indices"]]) for c in info["clients"]]
    for c in info["clients"]:
        del c["all_indices"]
    return clients, [tokenized[i] for i in info["global_test_indices"]], info


def _cap(indices: list[int], cap: int | None, seed: int) -> list[int]:
    if cap is None or len(indices) <= cap:
        return list(indices)
    return sorted(random.Random(seed).sample(list(indices), cap))
