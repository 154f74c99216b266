"""Every registered method's declarations (``ranks``, ``scales``, ``merges``, ``exact``, ``sums_only``,
``kind``) checked against what the method does, not against a list of names (float64).

Compare, study, export, benches and the one-rank errors read these declarations instead of
probing, so a wrong one is a wrong run: each is tested both ways.
"""

from pathlib import Path

import pytest
import torch

from fedlora.federation import diagnostics
from fedlora.methods import REGISTRY, MethodError, Setup, build_method, declared
from fedlora.methods.base import ClientUpdate, Factors, as_received, client_finish, client_prepare
from fedlora.methods.checks import heterogeneous
from fedlora.methods.registry import _problem
from fedlora.methods.state import state_dict
from fedlora.ops.weights import data_weights
from fedlora.train.client import ClientState, start_delta

LAYERS = {"l0.q": (10, 8), "l0.v": (6, 8)}
HETERO = {0: 4, 1: 2, 2: 1}
ONE = {0: 2, 1: 2, 2: 2}
NAMES = sorted(REGISTRY)


def _setup(ranks, scales=None, **options):
    return Setup(LAYERS, ranks, scales or {k: 2.0 for k in ranks}, seed=3, dtype=torch.float64, options=options)


def _build(name, **options):
    """The method at heterogeneous ranks where it declares it accepts them, else at one rank."""
    return build_method(name, _setup(HETERO if REGISTRY[name].ranks == "any" else ONE, **options))


def _round(method, gen, counts=(5, 8, 11)):
    """One round on random float64 uploads: (plans, received updates, what each client started from, counts)."""
    clients = [0] if method.pooled else sorted(method.setup.ranks)
    plans, updates, starts = [], [], []
    for k in clients:
        plan = method.client_start(client_prepare(method, method.plan(k, 1)), None)
        state = ClientState()
        state.catch_up(plan)
        starts.append(start_delta(state, plan))
        factors = {}
        for n, (d_out, d_in) in LAYERS.items():
            r = plan.rank_pattern.get(n, plan.rank)
            init = (plan.init or {}).get(n)
            B = torch.randn(d_out, r, generator=gen, dtype=torch.float64) if plan.train_B or init is None else init.B.double()
            A = torch.randn(r, d_in, generator=gen, dtype=torch.float64) if plan.train_A or init is None else init.A.double()
            factors[n] = Factors(B, A)
        update = client_finish(method, plan, ClientUpdate(k, counts[k], plan.scale, factors))
        plans.append(plan)
        updates.append(as_received(update, plan, LAYERS))
    return plans, updates, starts, [u.num_examples for u in updates]


def _state(method) -> dict[str, torch.Tensor]:
    return state_dict(method)[0]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and float(torch.linalg.norm(a[k].double() - b[k].double())) <= 1e-10 * max(1.0, float(torch.linalg.norm(b[k].double())))
        for k in a
    )


@pytest.mark.parametrize("name", NAMES)
def test_declarations_take_their_accepted_values(name):
    cls = REGISTRY[name]
    assert _problem(cls) is None
    assert declared(cls)["kind"] == ("pooled" if cls.pooled else "personal" if cls.personal else "global")
    assert not (cls.kind == "personal" and cls.exact), "no global model: nothing to be exact about"


@pytest.mark.parametrize("name", NAMES)
def test_ranks_one_iff_heterogeneous_ranks_are_refused(name):
    build_method(name, _setup(ONE))  # every method takes one rank for all
    if REGISTRY[name].ranks == "one":
        with pytest.raises(MethodError, match="needs one rank"):
            build_method(name, _setup(HETERO))
    else:
        build_method(name, _setup(HETERO))


@pytest.mark.parametrize("name", NAMES)
def test_scales_one_iff_unequal_scales_are_refused(name):
    ranks = HETERO if REGISTRY[name].ranks == "any" else ONE
    unequal = {0: 1.0, 1: 2.0, 2: 3.0}
    if REGISTRY[name].scales == "one":
        with pytest.raises(MethodError, match="scale"):
            build_method(name, _setup(ranks, unequal))
    else:
        build_method(name, _setup(ranks, unequal))


def test_the_one_rank_error_names_the_methods_that_declare_any_rank():
    expected = [n for n, c in REGISTRY.items() if c.ranks == "any" and c.communicates]
    assert heterogeneous().split(", ") == expected and "flora" in expected and "fedit" not in expected
    with pytest.raises(MethodError) as e:
        build_method("fedit", _setup(HETERO))
    assert str(e.value).endswith(f"heterogeneous method: {', '.join(expected)})")


@pytest.mark.parametrize("name", NAMES)
def test_merges_iff_the_method_merges_into_the_base(name, gen):
    method = _build(name)
    assert (method.merged is not None) == method.merges
    assert all((method.plan(k, 1).base is not None) == method.merges for k in method.setup.ranks)
    if method.merges:  # after a round, the base holds what the round merged
        plans, updates, _, counts = _round(method, gen)
        method.aggregate(updates, counts, 1)
        assert method.base_delta() and any(terms for terms in method.base_delta().values())


@pytest.mark.parametrize("name", NAMES)
def test_exact_iff_a_round_reaches_the_fedavg_ideal(name, gen):
    """agg_noise ~ 0 (FedAvg by example counts) iff the method declares ``exact``; a personal method has no global model."""
    method = _build(name)
    before = method.global_delta()
    _, updates, starts, counts = _round(method, gen)
    method.aggregate(updates, counts, 1)
    if method.kind == "personal":
        assert not method.exact and not any(method.global_delta().values())
        return
    noise = diagnostics.agg_noise(before, method.global_delta(), starts, updates, data_weights(counts))
    assert (noise < 1e-10) if method.exact else (noise > 1e-6), (name, noise)


def test_an_option_that_makes_a_method_inexact_says_so_on_the_instance(gen):
    """FLoRA's ``scaling`` c ≠ 1 moves the merge off the ideal by |c − 1|: the instance declares it."""
    method = _build("flora", scaling=0.5)
    assert REGISTRY["flora"].exact and not method.exact
    before = method.global_delta()
    _, updates, starts, counts = _round(method, gen)
    method.aggregate(updates, counts, 1)
    assert diagnostics.agg_noise(before, method.global_delta(), starts, updates, data_weights(counts)) > 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_sums_only_iff_the_aggregate_reads_only_weighted_sums_of_equal_uploads(name, gen):
    """Sums-only: every client uploads tensors of one shape, and moving uploads in ways that keep
    Σ_k n_k T_k leaves the method's whole state as it was. Otherwise one of the two fails.

    A sums-only method may pad: then what must have one shape is each client's *contribution*
    (its upload zero-padded, indicators of its slots), checked in the next test."""
    a, b = _build(name), _build(name)
    plans, updates, _, counts = _round(a, gen)
    uploaded = [(n, w) for n in LAYERS for w in plans[0].upload]
    shapes = {(n, w): {getattr(u.factors[n], w).shape for u in updates} for n, w in uploaded}
    equal = all(len(s) == 1 for s in shapes.values())
    moved = updates
    if equal and len(updates) > 1:  # T_0 += D / n_0, T_1 −= D / n_1: every Σ_k n_k T_k unchanged
        moved = [ClientUpdate(u.client, u.num_examples, u.scale, dict(u.factors), meta=dict(u.meta)) for u in updates]
        for n, w in uploaded:
            D = torch.randn(next(iter(shapes[(n, w)])), generator=gen, dtype=torch.float64)
            for u, sign in ((moved[0], 1.0), (moved[1], -1.0)):
                f = u.factors[n]
                f = Factors(f.B + sign * D / u.num_examples, f.A) if w == "B" else Factors(f.B, f.A + sign * D / u.num_examples)
                u.factors[n] = f
    a.aggregate(updates, counts, 1)
    b.aggregate(moved, counts, 1)
    invariant = _same(_state(a), _state(b))
    if REGISTRY[name].sums_only:
        assert (equal and invariant) or any(len(s) > 1 for s in shapes.values()), (name, shapes, invariant)
    else:
        assert not (equal and invariant), f"{name} reads only sums of equal uploads: declare sums_only = True"


@pytest.mark.parametrize("name", sorted(n for n, cls in REGISTRY.items() if cls.sums_only))
def test_a_sums_only_methods_state_follows_from_the_weighted_sum_of_equal_contributions_alone(name, gen):
    """Every client's contribution has one shape per key, and contributions moved so that Σ_k w_k T_k
    stays give, through ``from_means``, the state ``aggregate`` reaches from the real uploads."""
    a, b = _build(name), _build(name)
    _, updates, _, counts = _round(a, gen)
    a.aggregate(updates, counts, 1)
    w = [b.weigh(n) for n in counts]
    contributions = [{k: t.double().clone() for k, t in b.contribution(u, 1).items()} for u in updates]
    shapes = {key: {c[key].shape for c in contributions} for key in contributions[0]}
    assert all(len(s) == 1 for s in shapes.values()), (name, shapes)
    if len(contributions) > 1:
        for key in shapes:
            D = torch.randn(next(iter(shapes[key])), generator=gen, dtype=torch.float64)
            contributions[0][key] += D / w[0]
            contributions[1][key] -= D / w[1]
    means = {key: sum(wk * c[key] for wk, c in zip(w, contributions)) / sum(w) for key in shapes}
    b.from_means(means, 1)
    assert _same(_state(a), _state(b))


def test_the_table_in_methods_md_is_what_the_methods_declare():
    text = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    section = text.split("## What each method declares", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    yn = {True: "yes", False: "no"}
    ours = {n: c for n, c in REGISTRY.items() if c.__module__.startswith("fedlora.")}  # not the installed example package's
    expected = {n: [d["ranks"], d["scales"], yn[d["exact"]], yn[d["merges"]], yn[d["sums_only"]], d["kind"]] for n, d in ((n, declared(c)) for n, c in ours.items())}
    assert rows == expected
