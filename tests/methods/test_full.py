"""`full`: FedAvg of the adapted layers' weights, written as a LoRA with A = I frozen."""

import torch

from fedlora.methods.base import ClientUpdate, Factors, client_prepare, plan_nbytes, update_nbytes
from fedlora.methods.full import FullFedAvg
from fedlora.methods import Setup
from fedlora.model.adapters import AdapterHost
from fedlora.model.loading import target_layer_shapes
from fedlora.federation.diagnostics import agg_noise, init_noise

from tests.conftest import rel_err

LAYERS = {"a": (6, 5), "b": (3, 5)}


def _updates(gen, n=(4, 12)):
    return [
        ClientUpdate(k, nk, 1.0, {name: Factors(torch.randn(o, i, generator=gen, dtype=torch.float64), torch.eye(i, dtype=torch.float64)) for name, (o, i) in LAYERS.items()})
        for k, nk in enumerate(n)
    ]


def test_fedavg_of_weights_is_exact_and_bytes_are_dense(gen):
    m = FullFedAvg(Setup(LAYERS, {0: 1, 1: 1}, {0: 2.0, 1: 2.0}, dtype=torch.float64))
    plan = m.plan(0, 1)
    assert plan_nbytes(plan) == 8 * sum(o * i for o, i in LAYERS.values())  # B̄ only, no identity
    prepared = client_prepare(m, plan)
    assert all(torch.equal(f.A, torch.eye(LAYERS[n][1], dtype=torch.float64)) for n, f in prepared.init.items())
    assert init_noise({}, {}, prepared) == 0.0
    ups = _updates(gen)
    assert update_nbytes(ups[0], prepared.upload) == 8 * sum(o * i for o, i in LAYERS.values())
    before = m.global_delta()
    m.aggregate(ups, [0.25, 0.75], 1)
    for name in LAYERS:
        want = 0.25 * ups[0].factors[name].B + 0.75 * ups[1].factors[name].B
        assert rel_err(m.global_delta()[name][0].dense(), want) < 1e-14
    assert agg_noise(before, m.global_delta(), [{}, {}], ups, [0.25, 0.75]) < 1e-12


def test_training_B_with_identity_A_is_training_W(tiny_llama):
    """Same loss, and the gradient of B equals the gradient of W (scale 1)."""
    shapes = target_layer_shapes(tiny_llama, ["q_proj"])
    host = AdapterHost(tiny_llama, list(shapes))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    name = next(iter(shapes))
    d_out, d_in = shapes[name]
    init = {n: Factors(torch.zeros(o, i, dtype=torch.float64), torch.eye(i, dtype=torch.float64)) for n, (o, i) in shapes.items()}
    with host.adapter(d_in, 1.0, ["q_proj"], init=init, train_A=False) as pm:
        loss = pm(input_ids=ids).logits.pow(2).mean()
        loss.backward()
        grad_B = host.lora_layers(pm)[name].lora_B["default"].weight.grad.clone()
    weight = dict(host.model.named_modules())[name].weight
    weight.requires_grad_(True)
    loss_w = host.model(input_ids=ids).logits.pow(2).mean()
    loss_w.backward()
    grad_W = weight.grad.clone()
    weight.grad = None
    weight.requires_grad_(False)
    assert abs(float(loss) - float(loss_w)) < 1e-12
    assert rel_err(grad_B, grad_W) < 1e-10
