"""Uploads in a narrower dtype than the state (bfloat16 factors into a float64 or float32 server), straight into
``aggregate()``: FLoRA, FlexLoRA, FFA-LoRA (and FLoRIST, which folds as FLoRA does) cast each upload to the state's
dtype before p_k s_k scales it, so the result is the one the normal round gets by casting first, and in float64
the exact Σ p_k s_k B_k A_k of the uploaded numbers. Scaled in bfloat16, p_k s_k A_k lost ~1e-3 of itself (FLoRA,
FlexLoRA, FLoRIST before the fix; FFA's B was already summed in the state's dtype on CPU, its case guards that)."""

import pytest
import torch

from fedlora.methods import Setup, build_method
from fedlora.methods.base import ClientUpdate, Factors
from fedlora.ops.lowrank import densify
from fedlora.ops.weights import data_weights

from tests.conftest import rel_err

LAYERS = {"l0.q": (40, 30), "l0.v": (20, 50)}
HETERO = {0: 4, 1: 2, 2: 3}
SCALES = {0: 2.0, 1: 0.7, 2: 1.3}  # unequal s_k: the coefficient is p_k s_k, not a power of two
N = (5, 12, 19)


def _method(name: str, dtype: torch.dtype):
    one = name == "ffa"  # one rank and one scale for every client
    ranks = {k: 4 for k in HETERO} if one else HETERO
    scales = {k: 2.0 for k in HETERO} if one else SCALES
    options = {"energy": 1.0} if name == "florist" else {}
    return build_method(name, Setup(LAYERS, ranks, scales, seed=3, dtype=dtype, options=options))


def _uploads(m, gen: torch.Generator, wire: torch.dtype) -> list[ClientUpdate]:
    """Each client's factors drawn in float64 and rounded to ``wire``; FFA's A is the shared frozen one (it never travels)."""
    out = []
    for k in HETERO:
        factors = {}
        for name, (d_out, d_in) in LAYERS.items():
            r = m.setup.rank_of(k, name)
            B = torch.randn(d_out, r, generator=gen, dtype=torch.float64).to(wire)
            A = m.A[name].clone() if m.name == "ffa" else torch.randn(r, d_in, generator=gen, dtype=torch.float64).to(wire)
            factors[name] = Factors(B, A)
        out.append(ClientUpdate(client=k, num_examples=N[k], scale=m.setup.scales[k], factors=factors))
    return out


def _cast(updates: list[ClientUpdate], dtype: torch.dtype) -> list[ClientUpdate]:
    return [ClientUpdate(client=u.client, num_examples=u.num_examples, scale=u.scale,
                         factors={n: Factors(f.B.to(dtype), f.A.to(dtype)) for n, f in u.factors.items()}) for u in updates]


def _global(m) -> dict[str, torch.Tensor]:
    return {n: densify(terms, LAYERS[n], torch.float64).W for n, terms in m.global_delta().items()}


@pytest.mark.parametrize("name", ["flora", "flexlora", "ffa", "florist"])
@pytest.mark.parametrize("state", [torch.float64, torch.float32])
def test_a_bfloat16_upload_is_cast_before_it_is_scaled(gen, name, state):
    direct, cast_first = _method(name, state), _method(name, state)
    updates = _uploads(direct, gen, torch.bfloat16)
    weights = data_weights(N)
    direct.aggregate(updates, weights, 1)
    cast_first.aggregate(_cast(updates, state), weights, 1)  # what the normal round does
    got, want = _global(direct), _global(cast_first)
    for layer in LAYERS:
        assert torch.equal(got[layer], want[layer]), (layer, rel_err(got[layer], want[layer]))
        if state == torch.float64:  # the exact weighted sum of the uploaded numbers
            ideal = sum(p * u.scale * u.factors[layer].B.double() @ u.factors[layer].A.double() for u, p in zip(updates, weights))
            assert rel_err(got[layer], ideal) < 1e-12
    for terms in direct.global_delta().values():
        assert all(t.dtype == state for term in terms for t in term.tensors())  # the state keeps its dtype
