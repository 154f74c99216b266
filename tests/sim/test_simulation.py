"""The round loop over every registered method, on a tiny random Llama (seconds, no SmolLM2)."""

import math
from types import SimpleNamespace

import pytest
import torch

from fedlora.config import load_config, packaged_config
from fedlora.data.formatting import TokenizedExample
from fedlora.methods import REGISTRY, Setup, build_method
from fedlora.model.adapters import AdapterHost
from fedlora.model.loading import target_layer_shapes
from fedlora.federation.experiment import ClientData, Experiment
from fedlora.sim.federation import Simulation
from fedlora.train.local import LocalTrainer

TARGETS = ["q_proj", "v_proj"]


def _examples(n, seed):
    """Counting sequences (next token = this one + 1): learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        start = int(torch.randint(3, 64, (1,), generator=gen))
        ids = [3 + (start + j) % 61 for j in range(6 + i % 4)]
        out.append(TokenizedExample(input_ids=ids, labels=[-100] * 3 + ids[3:]))
    return out


def _experiment(tiny_llama, method_name, ranks, fraction=1.0, extra=()):
    cfg = load_config(packaged_config("tiny"), [f"lora.ranks={list(ranks)}", "federation.rounds=2", f"federation.fraction={fraction}",
                                                "train.local_steps=2", "train.lr=0.05", f"federation.method={method_name}", *extra])
    shapes = target_layer_shapes(tiny_llama, TARGETS)
    setup = Setup(shapes, dict(enumerate(cfg.client_ranks())), dict(enumerate(cfg.client_scales())), seed=0)
    method = build_method(method_name, setup)
    host = AdapterHost(tiny_llama, list(shapes))
    trainer = LocalTrainer(host, cfg.train, TARGETS, 0, torch.device("cpu"), 0)
    clients = [ClientData(k, _examples(8 + 4 * k, k), _examples(4, 100 + k)) for k in range(3)]
    return Experiment(cfg, None, torch.device("cpu"), host, SimpleNamespace(pad_token_id=0), clients, _examples(6, 99), method, trainer, {})


def _run(exp):
    records = []
    Simulation(exp).run(records.append)
    return records


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_runs_in_the_simulator(tiny_llama, name):
    exp = _experiment(tiny_llama, name, (4, 2, 1) if REGISTRY[name].ranks == "any" else (2, 2, 2))
    records = _run(exp)
    assert [r["round"] for r in records] == [0, 1, 2]
    final, first = records[-1]["eval"], records[0]["eval"]
    assert math.isfinite(final["global"]["loss"]) and set(final["clients"]) == {"0", "1", "2"}
    assert final["global"]["loss"] < first["global"]["loss"]  # counting is learnable: loss falls
    for r in records[1:]:
        if not exp.method.communicates:
            assert r["bytes_up"] == r["bytes_down"] == 0
        else:
            assert r["bytes_up"] > 0
    if exp.method.pooled:
        assert [c["id"] for c in records[1]["clients"]] == [0]
        assert records[1]["clients"][0]["num_examples"] == 8 + 12 + 16


@pytest.mark.parametrize("name", ["flora", "local", "fedsa"])  # the global model; personal models; clients that keep a part
def test_client_splits_ends_scores_the_clients_own_splits_only_before_and_after(tiny_llama, name):
    ranks = (2, 2, 2) if name == "fedsa" else (4, 2, 1)
    every = _run(_experiment(tiny_llama, name, ranks))
    ends = _run(_experiment(tiny_llama, name, ranks, extra=["federation.rounds=3", "eval.client_splits=ends"]))
    assert [set(r["eval"]["clients"]) for r in ends] == [{"0", "1", "2"}, set(), set(), {"0", "1", "2"}]
    assert all(r["eval"]["clients"] == {} or all(v for v in r["eval"]["clients"].values()) for r in ends)
    assert all(math.isfinite(r["eval"]["global"]["loss"]) for r in ends)  # the global split at every evaluation
    assert all(set(r["eval"]["clients"]) == {"0", "1", "2"} for r in every)  # the default: every evaluation


def test_flora_partial_participation_in_the_loop(tiny_llama):
    exp = _experiment(tiny_llama, "flora", (4, 2, 1), fraction=0.67)
    records = _run(exp)
    assert all(len(r["clients"]) == 2 for r in records[1:])
    assert all(r["agg_noise"] < 1e-6 and r["init_noise"] < 1e-6 for r in records[1:])


def test_adalora_is_a_trainer_variant_whose_pruned_uploads_the_server_takes(tiny_llama):
    """lora.adapter=adalora changes the trainer only: the uploads come back pruned, no reply is rejected."""
    from fedlora.train.adalora import AdaLoraTrainer

    exp = _experiment(tiny_llama, "flora", (4, 4, 4))
    exp.trainer = AdaLoraTrainer(exp.host, exp.cfg.train, TARGETS, 0, torch.device("cpu"), 0, target=0.5)
    records = _run(exp)
    planned = 4 * len(exp.method.setup.layers)
    for r in records[1:]:
        assert r["rejected"] == [] and len(r["clients"]) == 3
        assert all(0 < c["local_rank_sum"] < planned for c in r["clients"])  # pruned towards half of r_k
        assert r["agg_noise"] < 1e-6  # FLoRA's stack of the pruned factors is still exact
