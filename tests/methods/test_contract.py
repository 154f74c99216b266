"""What the round may rely on from every method, whatever it is given (float64 unless said otherwise).

Weights arrive unnormalised (example counts) and must not scale the aggregate; uploads in another
dtype are cast, the state keeps its own; HETLoRA's norm weights survive extreme factors and give a
client without examples no weight; the round records the weights the method actually applied.
"""

import math

import pytest
import torch

from fedlora.federation.round import Arrival, bounds_of, finish_round, start_of
from fedlora.methods import REGISTRY, Setup, build_method
from fedlora.methods.base import Factors
from fedlora.methods.state import pack, state_of

from tests.conftest import random_update, rel_err

LAYERS = {"l0.q": (12, 10), "l0.v": (6, 10)}
HETERO = {0: 4, 1: 2, 2: 1}


def _build(name, dtype=torch.float64, **options):
    cls = REGISTRY[name]
    ranks = HETERO if cls.ranks == "any" else {k: 2 for k in HETERO}
    ranks = ranks if cls.kind != "pooled" else {0: 4}  # one pooled client
    return build_method(name, Setup(LAYERS, ranks, {k: 2.0 for k in ranks}, seed=0, dtype=dtype, options=options))


def _updates(method, gen, counts, dtype=torch.float64):
    out = []
    for k, n in zip(sorted(method.setup.ranks), counts):
        plan = method.client_prepare(method.plan(k, 1))
        u = random_update(k, LAYERS, plan.rank, plan.scale, n, gen)
        if plan.init is not None and not plan.train_A:  # a frozen A comes back as sent
            u.factors = {name: Factors(u.factors[name].B, plan.init[name].A.double()) for name in LAYERS}
        u = method.client_finish(plan, u)
        u.factors = {name: Factors(f.B.to(dtype), f.A.to(dtype)) for name, f in u.factors.items()}
        out.append((plan, u))
    return out


def _dense(method):
    return {n: sum(t.dense().double() for t in terms) for n, terms in method.global_delta().items() if terms}


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n not in ("full", "local")))
def test_example_counts_and_their_normalisation_give_the_same_aggregate(name, gen):
    a, b = _build(name), _build(name)
    pairs = _updates(a, gen, [10, 30, 60][: len(a.setup.ranks)])
    counts = [u.num_examples for _, u in pairs]
    a.aggregate([u for _, u in pairs], counts, 1)
    b.aggregate([u for _, u in pairs], [c / sum(counts) for c in counts], 1)
    da, db = _dense(a), _dense(b)
    assert da.keys() == db.keys() and all(rel_err(da[n], db[n]) < 1e-12 for n in da), name


@pytest.mark.parametrize("upload", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_uploads_in_another_dtype_leave_the_state_in_its_own(name, upload, gen):
    method = _build(name, dtype=torch.float32)
    pairs = _updates(method, gen, [10, 30, 60][: len(method.setup.ranks)], dtype=upload)
    arrivals = [Arrival(plan, plan, u, start_of(method, plan)) for plan, u in pairs]
    finish_round(method, bounds_of(method, 1e6), 1, name, [p.client for p, _ in pairs], 1, method.global_delta(), arrivals, lambda *a: None)
    tensors = {}
    pack(state_of(method), tensors)  # every tensor of the method's state
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    assert dtypes == {torch.float32}, (name, dtypes)


def test_hetlora_norm_weights_survive_extreme_factors_and_skip_clients_without_examples(gen):
    m = _build("hetlora")
    pairs = _updates(m, gen, [10, 0, 20])
    huge, tiny = pairs[0][1], pairs[2][1]
    for f in huge.factors.values():
        f.B.mul_(1e25)
    for f in tiny.factors.values():
        f.B.mul_(1e-25)
    updates = [u.__class__(u.client, u.num_examples, u.scale, {n: Factors(f.B.float(), f.A.float()) for n, f in u.factors.items()}) for _, u in pairs]
    w = m.aggregate(updates, [10, 0, 20], 1)
    assert all(math.isfinite(x) for x in w) and w[1] == 0.0 and math.isclose(sum(w), 1.0)
    assert w[0] > 0.999 and 0 < w[2] < 1e-40  # ‖s B A‖ ratios 1e50: in float32 the squares would be inf and 0
    assert all(torch.isfinite(t.dense()).all() for ts in m.global_delta().values() for t in ts)


def test_the_round_records_the_weights_the_method_applied(gen):
    m = _build("hetlora")  # weights: norm
    pairs = _updates(m, gen, [10, 30, 60])
    arrivals = [Arrival(plan, plan, u, start_of(m, plan)) for plan, u in pairs]
    entry = finish_round(m, bounds_of(m, 1e6), 1, "hetlora", [0, 1, 2], 1, m.global_delta(), arrivals, lambda *a: None)
    assert entry["weights"] == pytest.approx(m.last_weights, abs=0) and entry["weights"] != pytest.approx([0.1, 0.3, 0.6])
    flora = _build("flora", weights="uniform")
    pairs = _updates(flora, gen, [10, 30, 60])
    entry = finish_round(flora, bounds_of(flora, 1e6), 1, "flora", [0, 1, 2], 1, flora.global_delta(),
                         [Arrival(p, p, u, start_of(flora, p)) for p, u in pairs], lambda *a: None)
    assert entry["weights"] == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("name", sorted(n for n, cls in REGISTRY.items() if "weight_cap" in cls.options))
def test_capped_weights_are_min_of_count_and_cap_for_every_method_that_weighs(name, gen):
    """``weights: capped``: w_k = min(n_k, cap), applied and recorded as such, whatever the method's algebra."""
    method = _build(name, weights="capped", weight_cap=25)
    pairs = _updates(method, gen, [10, 30, 60][: len(method.setup.ranks)])
    counts = [u.num_examples for _, u in pairs]
    applied = method.aggregate([u for _, u in pairs], counts, 1)
    capped = [min(n, 25) for n in counts]
    assert applied == pytest.approx([w / sum(capped) for w in capped], rel=1e-12), (name, applied)


@pytest.mark.parametrize("name", sorted(n for n, cls in REGISTRY.items() if "weight_cap" in cls.options))
def test_capped_weights_without_a_cap_are_one_line(name):
    from fedlora.methods import MethodError

    with pytest.raises(MethodError, match=r"^federation\.options\.weight_cap: invalid value 0 for .* with weights: capped \(accepted: a number of examples > 0\)$"):
        _build(name, weights="capped")
