"""PEFT bridge on a tiny random Llama in float64: methods.md §3 items 1 and 3 (model side)."""

import torch
from peft import PeftModel

from fedlora.methods import Setup, build_method
from fedlora.methods.base import Factors
from fedlora.model.adapters import AdapterHost, read_factors
from fedlora.model.export import save_adapter
from fedlora.model.loading import target_layer_shapes
from fedlora.ops.weights import data_weights

from tests.conftest import random_update, rel_err

TARGETS = ["q_proj", "v_proj"]


def _host(model):
    shapes = target_layer_shapes(model, TARGETS)
    return AdapterHost(model, list(shapes)), shapes


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fresh_adapter_leaves_outputs_unchanged(tiny_llama):
    host, _ = _host(tiny_llama)
    ids = torch.randint(0, 64, (2, 9))
    base = _logits(host.model, ids)
    with host.adapter(4, 2.0, TARGETS, seed=7) as pm:
        factors = read_factors(host.lora_layers(pm), 2.0)
        assert all(torch.count_nonzero(f.B) == 0 and torch.count_nonzero(f.A) > 0 for f in factors.values())
        assert torch.equal(_logits(pm, ids), base)
    assert torch.equal(_logits(host.model, ids), base)


def test_merged_flora_model_equals_base_plus_stacked_adapter(tiny_llama, gen):
    host, shapes = _host(tiny_llama)
    ranks, scales = {0: 3, 1: 2, 2: 1}, {0: 2.0, 1: 0.5, 2: 1.0}
    m = build_method("flora", Setup(shapes, ranks, scales, dtype=torch.float64))
    updates = [random_update(k, shapes, ranks[k], scales[k], 5 * (k + 1), gen) for k in ranks]
    for u in updates:
        for f in u.factors.values():
            f.B.mul_(0.05)
    m.aggregate(updates, data_weights([u.num_examples for u in updates]), 1)
    ids = torch.randint(0, 64, (2, 9))
    host.set_delta(m.global_delta())
    merged = _logits(host.model, ids)
    host.restore()
    stacked = {n: Factors(B=t[0].B, A=t[0].A) for n, t in m.global_delta().items()}  # scale already in A
    with host.adapter(6, 1.0, TARGETS, init=stacked) as pm:
        with_adapter = _logits(pm, ids)
    assert rel_err(merged, with_adapter) < 1e-10
    assert rel_err(merged, _logits(host.model, ids)) > 1e-6  # the merge did change the model


def test_restore_brings_back_the_pristine_weights_bit_for_bit(tiny_llama, gen):
    host, shapes = _host(tiny_llama)
    before = {n: p.clone() for n, p in host.model.state_dict().items()}
    u = random_update(0, shapes, 2, 1.0, 1, gen)
    from fedlora.ops.lowrank import LowRank

    host.set_delta({n: [LowRank(f.B, f.A)] for n, f in u.factors.items()})
    assert any(not torch.equal(before[n], p) for n, p in host.model.state_dict().items())
    host.restore()
    after = host.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_saved_adapter_reloads_with_peft_as_the_global_model(tiny_llama, gen, tmp_path):
    host, shapes = _host(tiny_llama)
    ranks = {0: 2, 1: 1}
    m = build_method("flora", Setup(shapes, ranks, {0: 2.0, 1: 2.0}, dtype=torch.float64))
    for rnd in (1, 2):
        ups = [random_update(k, shapes, ranks[k], 2.0, 3, gen) for k in ranks]
        for u in ups:
            for f in u.factors.values():
                f.B.mul_(0.05)
        m.aggregate(ups, [0.5, 0.5], rnd)
    ids = torch.randint(0, 64, (1, 7))
    host.set_delta(m.global_delta())
    expected = _logits(host.model, ids)
    host.restore()
    rank = save_adapter(host, m.global_delta(), TARGETS, tmp_path / "final", "tiny")
    assert rank == 6 and (tmp_path / "final" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(host.model, tmp_path / "final")
    got = _logits(loaded, ids)
    host.model = loaded.unload()
    assert rel_err(got, expected) < 1e-6  # the adapter file holds float32 factors


def test_model_base_has_the_servers_bits_whether_it_merges_each_round_or_resets(tiny_llama, gen):
    """methods.md §4: the simulator's model adds each round's merge once; a node back after many rounds
    resets to G_t − W_0; a resumed run rebuilds from the method's state — all three the same weights."""
    host, shapes = _host(tiny_llama)
    w0 = {n: p.clone() for n, p in tiny_llama.state_dict().items()}
    ranks = {k: 2 for k in range(6)}
    m = build_method("flora", Setup(shapes, ranks, {k: 2.0 for k in ranks}, dtype=torch.float64))
    for t in range(1, 13):  # 12 rounds of 2 clients: the 32-wide layers' base turns dense on the way
        ups = [random_update(k, shapes, 2, 2.0, 10, gen) for k in ((2 * t) % 6, (2 * t + 1) % 6)]
        m.aggregate(ups, data_weights([10, 10]), t)
        host.catch_up(m.merged.update_since(host.version))  # once per round, in place
        assert host.version == t
    every_round = {n: p.clone() for n, p in tiny_llama.state_dict().items()}
    assert any("Dense" == type(t).__name__ for ts in m.global_delta().values() for t in ts)
    for n, terms in m.global_delta().items():
        want = w0[n + ".weight"] + sum(t.dense() for t in terms)
        assert rel_err(every_round[n + ".weight"], want) < 1e-12
    host.reset_base()
    assert all(torch.equal(p, w0[n]) for n, p in tiny_llama.state_dict().items())
    host.catch_up(m.merged.update_since(0))  # a reset on every layer
    assert all(torch.equal(p, every_round[n]) for n, p in tiny_llama.state_dict().items())
    version, base = host.base_state()
    host.reset_base()
    host.load_base(version, base)  # a node's saved base
    assert all(torch.equal(p, every_round[n]) for n, p in tiny_llama.state_dict().items())
    host.reset_base()


def test_a_base_left_by_another_run_is_refused(tiny_llama, gen):
    """A node's saved base from a merging run must not leak into a run of a method that never merges."""
    import pytest

    host, shapes = _host(tiny_llama)
    m = build_method("flora", Setup(shapes, {0: 2}, {0: 2.0}, dtype=torch.float64))
    m.aggregate([random_update(0, shapes, 2, 2.0, 10, gen)], [1.0], 1)
    host.catch_up(m.merged.update_since(0))
    with pytest.raises(RuntimeError, match="never merges"):
        host.catch_up(None)
    host.reset_base()
    host.catch_up(None)  # the pristine base: fine
