"""Fed-PLoRA through the real client path (AdapterHost, ClientState, LocalTrainer): methods.md §3 item 9."""

import pytest
import torch

from fedlora.config import TrainCfg
from fedlora.data.formatting import TokenizedExample
from fedlora.methods import Setup
from fedlora.methods.base import Factors
from fedlora.methods.fedplora import FedPLoRA
from fedlora.model.adapters import AdapterHost
from fedlora.model.loading import target_layer_shapes
from fedlora.ops.lowrank import LowRank
from fedlora.federation.diagnostics import agg_noise, init_noise
from fedlora.train.client import ClientState, start_delta
from fedlora.train.local import LocalTrainer

from tests.conftest import rel_err

TARGETS = ["q_proj", "v_proj"]
RANKS = {0: 4, 1: 2, 2: 1}


def _host(model):
    shapes = target_layer_shapes(model, TARGETS)
    return AdapterHost(model, list(shapes)), shapes


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _method(shapes, gen, dtype=torch.float64, b_scale=0.05, **options):
    """FedPLoRA with a random global B_g, so the global model is not the base model."""
    m = FedPLoRA(Setup(shapes, RANKS, {k: 2.0 for k in RANKS}, seed=1, dtype=dtype, options=options))
    for f in m.factors.values():
        f.B.copy_(b_scale * torch.randn(f.B.shape, generator=gen, dtype=torch.float64))
    return m


def _global_logits(host, m, ids):
    host.set_delta(m.global_delta())
    try:
        return _logits(host.model, ids)
    finally:
        host.restore()


def _client_step0_logits(host, m, plan, ids, targets=TARGETS):
    """Exactly what LocalTrainer.fit installs before its first step."""
    state = ClientState()
    state.catch_up(plan)
    host.set_delta(start_delta(state, plan))
    try:
        with host.adapter(plan.rank, plan.scale, targets, init=plan.init, train_A=plan.train_A, rank_pattern=plan.rank_pattern) as pm:
            return _logits(pm, ids)
    finally:
        host.restore()


def test_rank_R_lora_equals_R_folded_one_rank_modules(tiny_llama, gen):
    host, shapes = _host(tiny_llama)
    m = _method(shapes, gen, modules=5)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    with host.adapter(m.R, m.scale, TARGETS, init={n: Factors(f.B, f.A) for n, f in m.factors.items()}) as pm:
        lora = _logits(pm, ids)
    modules = {n: [LowRank(m.scale * f.B[:, j : j + 1], f.A[j : j + 1]) for j in range(m.R)] for n, f in m.factors.items()}
    host.set_delta(modules)
    split = _logits(host.model, ids)
    host.restore()
    assert rel_err(split, lora) < 1e-10 and rel_err(_global_logits(host, m, ids), lora) < 1e-10


@pytest.mark.parametrize("selection", ["random", "first"])
def test_client_step0_logits_equal_the_global_model(tiny_llama, gen, selection):
    host, shapes = _host(tiny_llama)
    m = _method(shapes, gen, selection=selection, modules=5)
    ids = torch.randint(0, 64, (3, 11), generator=gen)
    base = _logits(host.model, ids)
    glob = _global_logits(host, m, ids)
    assert rel_err(glob, base) > 1e-4  # the global model is not the base
    before = m.global_delta()
    selections = set()
    for rnd in (1, 2, 3):
        for k in RANKS:
            plan = m.plan(k, rnd)
            selections.add((k, tuple(plan.meta["indices"].tolist())))
            assert rel_err(_client_step0_logits(host, m, plan, ids), glob) < 1e-10
            assert init_noise(before, start_delta(ClientState(), plan), plan) < 1e-12
    assert len(selections) > 3 if selection == "random" else len(selections) == 3  # random: re-drawn across rounds
    assert torch.equal(_logits(host.model, ids), base)  # the host is back at W_0


def test_folded_modules_get_no_gradient(tiny_llama, gen):
    """Only the r_k selected modules are parameters; the folded ones are inside the frozen weight."""
    host, shapes = _host(tiny_llama)
    m = _method(shapes, gen, modules=5)
    plan = m.plan(1, 1)
    host.set_delta(start_delta(ClientState(), plan))
    try:
        with host.adapter(plan.rank, plan.scale, TARGETS, init=plan.init) as pm:
            pm(input_ids=torch.randint(0, 64, (2, 7), generator=gen)).logits.pow(2).mean().backward()
            trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
            assert len(trainable) == 2 * len(shapes) and all("lora_" in n for n in trainable)
            assert all(min(p.shape) == RANKS[1] and p.grad is not None for p in trainable.values())
            assert all(p.grad is None for n, p in pm.named_parameters() if "lora_" not in n)
            for layer in host.lora_layers(pm).values():
                assert not layer.base_layer.weight.requires_grad
    finally:
        host.restore()


def _examples(n, gen):
    out = []
    for i in range(n):
        ids = torch.randint(3, 64, (6 + i % 5,), generator=gen).tolist()
        out.append(TokenizedExample(input_ids=ids, labels=[-100] * 3 + ids[3:]))
    return out


def test_trainer_trains_only_the_selected_modules(tiny_llama, gen):
    """Folded modules sit in the frozen weight: no factor comes back for them and aggregation keeps them."""
    host, shapes = _host(tiny_llama)
    trainer = LocalTrainer(host, TrainCfg(local_steps=3, batch_size=4, micro_batch_size=2, lr=1e-2), TARGETS, pad_id=0, device=torch.device("cpu"), seed=0)
    m = _method(shapes, gen, modules=5)
    pristine = {n: p.clone() for n, p in tiny_llama.state_dict().items()}
    data = _examples(8, gen)
    for rnd, k in ((1, 1), (2, 2), (3, 0)):  # one participant per round
        before_delta = m.global_delta()
        before = {n: (f.B.clone(), f.A.clone()) for n, f in m.factors.items()}
        plan = m.plan(k, rnd)
        state = ClientState()
        update, _ = trainer.fit(plan, data)
        update = m.client_finish(plan, update)
        assert all(torch.equal(pristine[n], p) for n, p in host.model.state_dict().items())
        K = plan.meta["indices"]
        U = [j for j in range(m.R) if j not in K.tolist()]
        assert torch.equal(update.meta["indices"], K)
        for name, f in update.factors.items():
            assert f.B.shape == (shapes[name][0], RANKS[k]) and f.A.shape == (RANKS[k], shapes[name][1])
            assert rel_err(f.B.double(), plan.init[name].B) > 1e-4  # the selected modules did train
        m.aggregate([update], [1.0], rnd)
        for name, f in m.factors.items():
            B0, A0 = before[name]
            assert torch.equal(f.B[:, U], B0[:, U]) and torch.equal(f.A[U], A0[U])  # unselected: bit for bit
            assert torch.equal(f.B[:, K], update.factors[name].B.double())  # one trainer: copied exactly
            assert torch.equal(f.A[K], update.factors[name].A.double())
        start = start_delta(state, plan)
        assert agg_noise(before_delta, m.global_delta(), [start], [update], [1.0]) < 1e-12


@pytest.mark.slow
def test_smollm2_client_step0_logits_equal_the_global_model():
    from fedlora.model.assets import embedded_model_dir
    from fedlora.model.loading import load_causal_lm

    model, tokenizer = load_causal_lm(embedded_model_dir(), torch.device("cpu"), torch.float32)
    host, shapes = _host(model)
    gen = torch.Generator().manual_seed(0)
    m = _method(shapes, gen, dtype=torch.float32, b_scale=0.02)
    ids = tokenizer("Federated fine-tuning with parallel one-rank modules folds the rest.", return_tensors="pt").input_ids
    base = _logits(model, ids)
    glob = _global_logits(host, m, ids)
    assert rel_err(glob, base) > 1e-3  # the global adapter changes the model
    for k in RANKS:
        plan = m.plan(k, 1)
        assert rel_err(_client_step0_logits(host, m, plan, ids), glob) < 1e-5
    assert torch.equal(_logits(host.model, ids), base)
