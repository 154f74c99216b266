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
from fedlora.data import load_examples, partition, tokenize_examples, train_test_split
from fedlora.data.formatting import TokenizedExample
from fedlora.methods import Method, Setup, build_method
from fedlora.model.adapters import AdapterHost
from fedlora.model.loading import load_causal_lm, meta_layer_shapes, pick_device, pick_dtype, resolve_model_dir
from fedlora.train.local import LocalTrainer

log = logging.getLogger(__name__)


@dataclass
class ClientData:
    id: int
    train: list[TokenizedExample]
    test: list[TokenizedExample]


@dataclass
class Experiment:
    cfg: Config
    model_dir: Path
    device: torch.device
    host: AdapterHost
    tokenizer: Any
    clients: list[ClientData]
    global_test: list[TokenizedExample]
    method: Method
    trainer: LocalTrainer
    partition_info: dict[str, Any]


def check_model(cfg: Config) -> tuple[Path, dict[str, tuple[int, int]]]:
    """The model folder exists, has the target layers, and every rank fits them."""
    model_dir = resolve_model_dir(cfg.model.path)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model.path: no HF model folder (config.json) at {model_dir} (accepted: a local folder saved with save_pretrained, or empty for the embedded SmolLM2)")
    shapes = meta_layer_shapes(model_dir, cfg.lora.target_modules)
    if not shapes:
        raise ConfigError(f"lora.target_modules: no Linear layer named {cfg.lora.target_modules} in {model_dir.name} (accepted: e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    found = {n.rsplit(".", 1)[-1] for n in shapes}
    if missing := [m for m in cfg.lora.target_modules if m not in found]:
        raise ConfigError(f"lora.target_modules: {missing} not found in {model_dir.name} (found: {sorted(found)})")
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


def prepare(cfg: Config) -> Experiment:
    model_dir, shapes = check_model(cfg)
    source = cfg.data.source
    if source != "chatterbot" and not Path(source).expanduser().is_file():
        raise ConfigError(f"data.source: file not found: {source} (accepted: 'chatterbot' or a local .json/.jsonl file)")
    examples = load_examples(source, language=cfg.data.language, max_examples=cfg.data.max_examples, seed=cfg.seed)

    setup = Setup(
        layers=shapes,
        ranks=dict(enumerate(cfg.client_ranks())),
        scales=dict(enumerate(cfg.client_scales())),
        seed=cfg.seed,
        options=cfg.federation.options,
        rank_patterns=cfg.client_rank_patterns(),
    )
    method = build_method(cfg.federation.method, setup)  # method errors before the model loads

    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    model, tokenizer = load_causal_lm(model_dir, device, dtype)
    kept = [(e, t) for e in examples for t in tokenize_examples([e], tokenizer, cfg.train.max_length)]
    examples, tokenized = [e for e, _ in kept], [t for _, t in kept]  # over-long prompts are dropped
    clients, global_test, info = split_clients(cfg, examples, tokenized)
    host = AdapterHost(model, list(shapes))
    trainer = LocalTrainer(
        host, cfg.train, cfg.lora.target_modules, tokenizer.pad_token_id, device, cfg.seed, cfg.lora.dropout,
        adalora_target=cfg.lora.adalora_target if cfg.lora.adapter == "adalora" else None, adalora_orth_reg=cfg.lora.adalora_orth_reg,
    )
    log.info("model %s on %s (%s); %d examples over %d clients", model_dir, device, dtype, len(tokenized), len(clients))
    return Experiment(cfg, model_dir, device, host, tokenizer, clients, global_test, method, trainer, info)


def split_clients(cfg: Config, examples: list, tokenized: list[TokenizedExample]) -> tuple[list[ClientData], list[TokenizedExample], dict[str, Any]]:
    """Global test split first, then the partition, then each client's own train/test split."""
    pool, global_idx = train_test_split(range(len(tokenized)), cfg.data.global_test_fraction, cfg.seed)
    cats = [examples[i].category for i in pool]
    parts = partition(cats, cfg.federation.num_clients, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.seed)
    cap = cfg.eval.max_examples
    clients, info_clients = [], []
    for k, part in enumerate(parts):
        idx = [pool[j] for j in part]
        train_idx, test_idx = train_test_split(idx, cfg.data.test_fraction, cfg.seed + k + 1)
        test_idx = _cap(test_idx, cap, cfg.seed + k)
        clients.append(ClientData(k, [tokenized[i] for i in train_idx], [tokenized[i] for i in test_idx]))
        info_clients.append({
            "id": k, "rank": cfg.client_ranks()[k], "train": len(train_idx), "test": len(test_idx),
            "categories": dict(Counter(examples[i].category for i in idx).most_common()),
            "train_indices": train_idx, "test_indices": test_idx,
        })
    global_idx = _cap(global_idx, cap, cfg.seed)
    info = {
        "source": cfg.data.source, "partition": cfg.data.partition, "alpha": cfg.data.alpha, "by": cfg.data.by,
        "num_examples": len(tokenized), "global_test": len(global_idx), "global_test_indices": global_idx, "clients": info_clients,
    }
    return clients, [tokenized[i] for i in global_idx], info


def _cap(indices: list[int], cap: int | None, seed: int) -> list[int]:
    if cap is None or len(indices) <= cap:
        return list(indices)
    return sorted(random.Random(seed).sample(list(indices), cap))
