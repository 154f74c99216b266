"""methods.md §3 item 4 and the FedIT column of item 11, in float64."""

import re

import pytest
import torch

from fedlora.methods import REGISTRY, MethodError, Setup, build_method
from fedlora.methods.base import plan_nbytes
from fedlora.ops.weights import data_weights

from tests.conftest import random_update, rel_err

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 10)}


def _fedit(n=3, rank=4, scale=2.0):
    return build_method("fedit", Setup(LAYERS, {k: rank for k in range(n)}, {k: scale for k in range(n)}, dtype=torch.float64))


def test_equals_weighted_means_of_each_factor(gen):
    m = _fedit()
    updates = [random_update(k, LAYERS, 4, 2.0, n, gen) for k, n in enumerate((5, 15, 30))]
    w = data_weights([5, 15, 30])
    m.aggregate(updates, w, 1)
    for name in LAYERS:
        B_bar = sum(p * u.factors[name].B for u, p in zip(updates, w))
        A_bar = sum(p * u.factors[name].A for u, p in zip(updates, w))
        assert rel_err(m.factors[name].B, B_bar) < 1e-14 and rel_err(m.factors[name].A, A_bar) < 1e-14
        (g,) = m.global_delta()[name]
        assert rel_err(g.dense(), 2.0 * B_bar @ A_bar) < 1e-14
        # the error against the ideal Σ p_k B_k A_k is exactly Σ p_k (B_k − B̄)(A_k − Ā)
        ideal = sum(p * u.factors[name].B @ u.factors[name].A for u, p in zip(updates, w))
        cross = sum(p * (u.factors[name].B - B_bar) @ (u.factors[name].A - A_bar) for u, p in zip(updates, w))
        assert rel_err(ideal - B_bar @ A_bar, cross) < 1e-12
        assert float(torch.linalg.norm(cross)) > 1e-3  # not exact: the product of means is not the mean of products


@pytest.mark.parametrize("changed", [0, 1, 2])
def test_result_depends_on_every_client(gen, changed):
    """The FLoRA reference code's FedIT silently kept only the first client; ours must not."""
    updates = [random_update(k, LAYERS, 4, 2.0, 10, gen) for k in range(3)]
    m1 = _fedit()
    m1.aggregate(updates, [1 / 3] * 3, 1)
    updates[changed].factors["l0.q"].B.add_(1.0)
    m2 = _fedit()
    m2.aggregate(updates, [1 / 3] * 3, 1)
    assert rel_err(m1.factors["l0.q"].B, m2.factors["l0.q"].B) > 1e-3


def test_heterogeneous_ranks_are_refused_with_alternatives():
    with pytest.raises(MethodError, match=r"fedit.*lora.ranks=\[4, 2\].*zeropad"):
        build_method("fedit", Setup(LAYERS, {0: 4, 1: 2}, {0: 2.0, 1: 2.0}))


def test_plan_sends_the_global_factors(gen):
    m = _fedit()
    plan = m.plan(1, 1)
    assert plan.init is not None and plan.rank == 4
    assert all(torch.count_nonzero(f.B) == 0 for f in plan.init.values())  # fresh global: B = 0
    assert plan_nbytes(plan) == 8 * 4 * sum(o + i for o, i in LAYERS.values())  # float64 here


def test_unknown_method_lists_the_registry():
    accepted = re.escape(", ".join(sorted(REGISTRY)))
    with pytest.raises(MethodError, match=rf"federation.method: unknown value 'nope' \(accepted: {accepted}, or package\.module:Class\)"):
        build_method("nope", Setup(LAYERS, {0: 1}, {0: 1.0}))
    with pytest.raises(MethodError, match=r"unknown value 'fed-plora' \(did you mean 'fedplora'\? accepted: centralized, "):
        build_method("fed-plora", Setup(LAYERS, {0: 1}, {0: 1.0}))
