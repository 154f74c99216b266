"""The local trainer on a tiny random Llama: plans are installed exactly and the base comes back."""

import math

import torch

from fedlora.config import TrainCfg
from fedlora.data.formatting import TokenizedExample
from fedlora.methods import Setup, build_method
from fedlora.model.adapters import AdapterHost
from fedlora.model.loading import target_layer_shapes
from fedlora.ops.weights import data_weights
from fedlora.train.adalora import AdaLoraTrainer
from fedlora.train.evaluate import heldout_loss

from tests.conftest import rel_err

TARGETS = ["q_proj", "v_proj"]


def _examples(n, gen):
    out = []
    for i in range(n):
        length = 6 + i % 5
        ids = torch.randint(3, 64, (length,), generator=gen).tolist()
        out.append(TokenizedExample(input_ids=ids, labels=[-100] * 3 + ids[3:]))
    return out


def _trainer(model, **train):
    from fedlora.train.local import LocalTrainer

    shapes = target_layer_shapes(model, TARGETS)
    host = AdapterHost(model, list(shapes))
    cfg = TrainCfg(local_steps=3, batch_size=4, micro_batch_size=2, lr=1e-2, **train)
    return LocalTrainer(host, cfg, TARGETS, pad_id=0, device=torch.device("cpu"), seed=0), shapes


def test_fit_trains_reads_back_and_restores_the_base(tiny_llama, gen):
    trainer, shapes = _trainer(tiny_llama)
    pristine = {n: p.clone() for n, p in tiny_llama.state_dict().items()}
    m = build_method("flora", Setup(shapes, {0: 2, 1: 3}, {0: 2.0, 1: 2.0}, dtype=torch.float64))
    data = _examples(12, gen)
    updates = []
    for k in (0, 1):
        update, stats = trainer.fit(m.plan(k, 1), data)
        assert stats.steps == 3 and stats.real_tokens > 0 and 0 <= stats.padded_fraction < 0.5
        assert all(f.B.shape == (shapes[n][0], 2 + k) and torch.count_nonzero(f.B) > 0 for n, f in update.factors.items())
        updates.append(update)
    assert all(torch.equal(pristine[n], p) for n, p in trainer.host.model.state_dict().items())
    m.aggregate(updates, data_weights([12, 12]), 1)
    # round 2: the plan brings the model's base to version 1, W_0 + the stack, once; training leaves it there
    plan = m.plan(0, 2)
    assert plan.base is not None and (plan.base.since, plan.base.version) == (0, 1)
    update, _ = trainer.fit(plan, data)
    assert trainer.host.version == 1
    merged = m.global_delta()
    for n, p in trainer.host.model.state_dict().items():
        layer = n.removesuffix(".weight")
        if layer in merged:
            assert rel_err(p, pristine[n] + sum(t.dense() for t in merged[layer])) < 1e-12, n
        else:
            assert torch.equal(pristine[n], p), n
    trainer.fit(m.plan(1, 2), data)  # another client of round 2: the same base, nothing applied again
    assert trainer.host.version == 1


def test_fit_is_reproducible_for_a_seed(tiny_llama, gen):
    trainer, shapes = _trainer(tiny_llama)
    m = build_method("flora", Setup(shapes, {0: 2}, {0: 2.0}, dtype=torch.float64))
    data = _examples(8, gen)
    a, _ = trainer.fit(m.plan(0, 1), data)
    b, _ = trainer.fit(m.plan(0, 1), data)
    name = next(iter(a.factors))
    assert torch.equal(a.factors[name].B, b.factors[name].B) and torch.equal(a.factors[name].A, b.factors[name].A)


def test_fedit_client_starts_from_the_global_model_and_training_lowers_loss(tiny_llama, gen):
    trainer, shapes = _trainer(tiny_llama)
    m = build_method("fedit", Setup(shapes, {0: 4, 1: 4}, {0: 2.0, 1: 2.0}, dtype=torch.float64))
    data = _examples(16, gen)
    ups = [trainer.fit(m.plan(k, 1), data)[0] for k in (0, 1)]
    m.aggregate(ups, [0.5, 0.5], 1)
    host = trainer.host
    host.set_delta(m.global_delta())
    global_loss = heldout_loss(host.model, data, 8, 0, torch.device("cpu"))
    host.restore()
    base_loss = heldout_loss(host.model, data, 8, 0, torch.device("cpu"))
    assert global_loss < base_loss
    plan = m.plan(0, 2)
    with host.adapter(plan.rank, plan.scale, TARGETS, init=plan.init) as pm:
        step0 = heldout_loss(pm, data, 8, 0, torch.device("cpu"))
    assert abs(step0 - global_loss) < 1e-10 * global_loss


def test_frozen_A_stays_fixed(tiny_llama, gen):
    trainer, shapes = _trainer(tiny_llama)
    m = build_method("fedit", Setup(shapes, {0: 2}, {0: 2.0}, dtype=torch.float64))
    plan = m.plan(0, 1)
    plan.train_A = False
    update, _ = trainer.fit(plan, _examples(8, gen))
    for n, f in update.factors.items():
        assert rel_err(f.A.double(), plan.init[n].A.double()) < 1e-7
        assert torch.count_nonzero(f.B) > 0


def test_rank_pattern_gives_layers_their_own_rank(tiny_llama, gen):
    trainer, shapes = _trainer(tiny_llama)
    setup = Setup(shapes, {0: 2}, {0: 2.0}, rank_patterns={"v_proj": {0: 5}})
    m = build_method("flora", setup)
    plan = m.plan(0, 1)
    assert plan.rank == 2 and set(plan.rank_pattern) == {n for n in shapes if n.endswith("v_proj")}
    update, _ = trainer.fit(plan, _examples(8, gen))
    for n, f in update.factors.items():
        assert f.rank == (5 if n.endswith("v_proj") else 2)


def test_regularizer_enters_the_gradient(tiny_llama, gen):
    trainer, shapes = _trainer(tiny_llama)
    m = build_method("fedit", Setup(shapes, {0: 2}, {0: 2.0}, dtype=torch.float64))
    data = _examples(8, gen)
    calls = []

    def shrink_A(live):
        calls.append(len(live))
        return 1e3 * sum(A.pow(2).sum() for _, A in live.values())

    plain, _ = trainer.fit(m.plan(0, 1), data)
    shrunk, _ = trainer.fit(m.plan(0, 1), data, regularizer=shrink_A)
    assert calls == [len(shapes)] * 3  # once per optimizer step, over every adapted layer
    norm = lambda u: sum(float(f.A.norm()) for f in u.factors.values())  # noqa: E731
    assert norm(shrunk) < norm(plain)


def test_adalora_prunes_and_its_factors_reproduce_the_adapter(tiny_llama, gen):
    """FLoRA + AdaLoRA: E and PEFT's exact scale fold into A; pruned components are dropped."""
    from fedlora.model.adapters import AdaLoraSpec, read_factors
    from fedlora.ops.lowrank import LowRank

    shapes = target_layer_shapes(tiny_llama, TARGETS)
    host = AdapterHost(tiny_llama, list(shapes))
    ids = torch.randint(3, 64, (2, 8), generator=gen)
    spec = AdaLoraSpec(target_r=2, total_step=3)
    with host.adapter(4, 2.0, TARGETS, adalora=spec) as pm:
        for layer in host.lora_layers(pm).values():  # a trained-looking adapter: nonzero E and B
            with torch.no_grad():
                layer.lora_E["default"].normal_(generator=gen)
                layer.lora_E["default"][0] = 0.0  # one pruned component
                layer.lora_B["default"].normal_(generator=gen)
        with torch.no_grad():
            expected = pm(input_ids=ids).logits
        factors = read_factors(host.lora_layers(pm), 2.0)
    assert all(f.rank == 3 for f in factors.values())
    host.set_delta({n: [LowRank(2.0 * f.B.double(), f.A.double())] for n, f in factors.items()})
    with torch.no_grad():
        got = host.model(input_ids=ids).logits
    host.restore()
    assert rel_err(got, expected) < 1e-6  # float32 factors


def test_adalora_training_reduces_the_rank(tiny_llama, gen):
    shapes = target_layer_shapes(tiny_llama, TARGETS)
    host = AdapterHost(tiny_llama, list(shapes))
    cfg = TrainCfg(local_steps=4, batch_size=4, micro_batch_size=4, lr=1e-2)
    trainer = AdaLoraTrainer(host, cfg, TARGETS, 0, torch.device("cpu"), 0, target=0.5)
    m = build_method("flora", Setup(shapes, {0: 4}, {0: 2.0}))
    update, stats = trainer.fit(m.plan(0, 1), _examples(16, gen))
    total = sum(f.rank for f in update.factors.values())
    assert total <= 2 * len(shapes) < 4 * len(shapes)  # budget: average rank 2 of 4
    assert all(torch.isfinite(f.A).all() for f in update.factors.values())


def test_precision_auto_follows_the_hardware_and_bfloat16_autocasts(monkeypatch):
    from fedlora.train import precision

    cpu = torch.device("cpu")
    assert precision.resolve("float32", cpu) is None and precision.resolve("bfloat16", cpu) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve("auto", cpu) is None
    x = torch.randn(4, 4)
    with precision.autocast(torch.bfloat16, cpu):
        assert (x @ x).dtype is torch.bfloat16
    with precision.autocast(None, cpu):
        assert (x @ x).dtype is torch.float32


def test_float16_trains_with_loss_scaling_and_uploads_float32(tiny_llama, gen):
    """train.precision=float16: autocast to float16, a GradScaler, the loss on one repeated batch falls, factors stay float32."""
    from fedlora.train import precision
    from fedlora.train.local import LocalTrainer

    cpu = torch.device("cpu")
    assert precision.resolve("float16", cpu) is torch.float16
    assert isinstance(precision.grad_scaler(torch.float16, cpu), torch.amp.GradScaler)
    assert precision.grad_scaler(torch.bfloat16, cpu) is None and precision.grad_scaler(None, cpu) is None
    tiny_llama.float()  # autocast casts float32 work to float16 (the fixture's float64 it leaves alone)
    shapes = target_layer_shapes(tiny_llama, TARGETS)
    host = AdapterHost(tiny_llama, list(shapes))
    cfg = TrainCfg(local_steps=6, batch_size=4, micro_batch_size=2, lr=1e-2, precision="float16")
    trainer = LocalTrainer(host, cfg, TARGETS, 0, cpu, 0)
    losses: list[float] = []
    update, stats = trainer.fit(build_method("flora", Setup(shapes, {0: 2}, {0: 2.0})).plan(0, 1), _examples(4, gen), on_step=losses.append)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(f.A.dtype is torch.float32 and torch.isfinite(f.B).all() and f.B.abs().sum() > 0 for f in update.factors.values())
    assert stats.steps == 6 and stats.skipped_steps == 0


def test_float16_counts_the_steps_an_overflow_skipped(tiny_llama, gen, monkeypatch):
    """A loss scale of 2^60 overflows every float16 gradient: no step is taken, each is counted, B stays zero."""
    from fedlora.train import local, precision
    from fedlora.train.local import LocalTrainer

    monkeypatch.setattr(local, "grad_scaler", lambda dtype, device: torch.amp.GradScaler(device.type, init_scale=2.0**60))
    tiny_llama.float()  # autocast casts float32 work to float16 (the fixture's float64 it leaves alone)
    shapes = target_layer_shapes(tiny_llama, TARGETS)
    trainer = LocalTrainer(AdapterHost(tiny_llama, list(shapes)), TrainCfg(local_steps=3, batch_size=4, micro_batch_size=4, lr=1e-2, precision="float16"),
                           TARGETS, 0, torch.device("cpu"), 0)
    update, stats = trainer.fit(build_method("flora", Setup(shapes, {0: 2}, {0: 2.0})).plan(0, 1), _examples(4, gen))
    assert precision.resolve("float16", torch.device("cpu")) is torch.float16
    assert (stats.steps, stats.skipped_steps) == (3, 3)
    assert all(float(f.B.abs().sum()) == 0.0 for f in update.factors.values())  # flora's B starts at zero: no step, no change
