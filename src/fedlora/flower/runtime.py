"""The objects a ClientApp process needs, built once per process: method, trainer, local data.

Both ways go through the simulator's own ``prepare`` (model, tokenizer, task, trainer), so a
node trains exactly as the in-process simulator's client does:

- without ``data-path``, the node builds the config's data and split and keeps its partition's
  training split: a Flower run and ``fedlora run`` train on the same examples;
- with one, the node's file is all of its data: ``prepare`` runs on a one-client copy of the
  config (that file as the source, no global test split) and the node keeps that client's
  training split.

The method object (for the client hooks) is always built for the real federation's Setup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import yaml

from fedlora.config import Config, ConfigError, build_config
from fedlora.methods import Method, Setup, build_method
from fedlora.train.local import LocalTrainer

log = logging.getLogger(__name__)


@dataclass
class ClientRuntime:
    cfg: Config
    method: Method  # the client-side hooks (client_prepare / client_regularizer / client_finish)
    trainer: LocalTrainer
    train: list[Any]  # TokenizedExample or ClassifiedExample
    test: list[Any]  # the partition's test split (clients evaluate their own model: Method.keeps)
    global_test: list[Any]  # the global test split (empty on a node with its own data)
    pad_id: int
    model_dir: Any = None  # where the base model lies (a node's own final adapter names it)


def config_from_text(text: str) -> Config:
    """The server's resolved config, as it travels in every train message."""
    return build_config(yaml.safe_load(text) or {}, [])


@lru_cache(maxsize=1)
def _federation(cfg_text: str) -> Any:
    """The simulator's ``prepare`` of the whole config, once per process: a Ray actor serves any partition in turn."""
    from fedlora.federation.experiment import prepare

    return prepare(config_from_text(cfg_text))


@lru_cache(maxsize=8)
def client_runtime(cfg_text: str, partition: int, num_partitions: int, data_path: str | None) -> ClientRuntime:
    """Model, tokenizer, data and method, loaded once per process (keyed by config and node)."""
    from fedlora.federation.experiment import check_model, prepare

    cfg = config_from_text(cfg_text)
    if cfg.federation.num_clients != num_partitions:
        raise ConfigError(f"node config: num-partitions={num_partitions} but federation.num_clients={cfg.federation.num_clients} (accepted: equal)")
    if data_path is None:
        exp = _federation(cfg_text)
        pooled = exp.method.pooled
        train = [e for c in exp.clients for e in c.train] if pooled else exp.clients[partition].train
        return ClientRuntime(cfg, exp.method, exp.trainer, train, exp.clients[partition].test, exp.global_test, exp.tokenizer.pad_token_id, exp.model_dir)
    exp = prepare(own_data_config(cfg, partition, data_path))
    _, shapes = check_model(cfg)
    log.info("partition %d: %d training examples from %s", partition, len(exp.clients[0].train), data_path)
    own = exp.clients[0]
    return ClientRuntime(cfg, build_method(cfg.federation.method, setup_of(cfg, shapes)), exp.trainer, own.train, own.test, [], exp.tokenizer.pad_token_id, exp.model_dir)


def own_data_config(cfg: Config, partition: int, data_path: str) -> Config:
    """A one-client copy of the config whose only client is this partition, holding the whole file."""
    raw = cfg.model_dump(mode="json")
    raw["data"].update(source=data_path, partition="iid", global_test_fraction=0.0)
    raw["federation"].update(num_clients=1, min_clients=1, fraction=1.0)
    raw["lora"].update(rank=None, ranks=[cfg.client_ranks()[partition]], scale=cfg.client_scales()[partition],
                       rank_patterns={k: v[partition] for k, v in cfg.client_rank_patterns().items()})
    return build_config(raw, [])


def setup_of(cfg: Config, shapes: dict[str, tuple[int, int]]) -> Setup:
    """The Setup the simulator builds for a config (same ranks, scales, seed, options)."""
    return Setup(
        layers=shapes, ranks=dict(enumerate(cfg.client_ranks())), scales=dict(enumerate(cfg.client_scales())),
        seed=cfg.seed, options=cfg.federation.options, rank_patterns=cfg.client_rank_patterns(),
    )
