"""The example package's methods against their own formulas, beyond what the contract tests check (float64):
server momentum over rounds, and the options that turn each back into FedIT."""

from __future__ import annotations

import torch

from fedlora.methods import Setup, build_method
from fedlora.methods.base import ClientUpdate, Factors

LAYERS = {"l0.q": (6, 5), "l0.v": (3, 5)}


def _setup(ranks, **options):
    return Setup(LAYERS, ranks, {k: 2.0 for k in ranks}, seed=1, dtype=torch.float64, options=options)


def _uploads(method, gen, counts, rnd):
    out = []
    for k, n in counts.items():
        plan = method.plan(k, rnd)
        factors = {}
        for name, (d_out, d_in) in LAYERS.items():
            r = plan.rank_pattern.get(name, plan.rank)
            factors[name] = Factors(torch.randn(d_out, r, generator=gen, dtype=torch.float64), torch.randn(r, d_in, generator=gen, dtype=torch.float64))
        out.append(ClientUpdate(k, n, plan.scale, factors))
    return out


def test_server_momentum_takes_fedavgm_steps_on_both_factors(gen):
    """x_t = x_{t−1} + v_t, v_t = β v_{t−1} + (x̄_t − x_{t−1}), over three rounds, from the means computed here."""
    beta, counts = 0.7, {0: 3, 1: 5, 2: 2}
    m = build_method("server-momentum", _setup({0: 2, 1: 2, 2: 2}, beta=beta))
    x = {n: (f.B.clone(), f.A.clone()) for n, f in m.factors.items()}
    v = {n: (torch.zeros_like(b), torch.zeros_like(a)) for n, (b, a) in x.items()}
    for rnd in (1, 2, 3):
        ups = _uploads(m, gen, counts, rnd)
        m.aggregate(ups, [u.num_examples for u in ups], rnd)
        total = sum(counts.values())
        for n in LAYERS:
            mean = [sum(u.num_examples * getattr(u.factors[n], w) for u in ups) / total for w in "BA"]
            v[n] = tuple(beta * v[n][i] + (mean[i] - x[n][i]) for i in range(2))
            x[n] = tuple(x[n][i] + v[n][i] for i in range(2))
            assert torch.allclose(m.factors[n].B, x[n][0], rtol=0, atol=1e-12) and torch.allclose(m.factors[n].A, x[n][1], rtol=0, atol=1e-12)


def test_without_momentum_or_mixing_the_examples_are_fedit(gen):
    """β = 0: the server steps to the means; α = 0: every client starts from the global factors, as FedIT's do."""
    ranks, counts = {0: 2, 1: 2}, {0: 4, 1: 6}
    fedit, momentum, mixed = (build_method(n, _setup(ranks, **o)) for n, o in (("fedit", {}), ("server-momentum", {"beta": 0.0}), ("mixed-personal", {"alpha": 0.0})))
    for rnd in (1, 2):
        ups = _uploads(fedit, gen, counts, rnd)
        for m in (fedit, momentum, mixed):
            m.aggregate(ups, [u.num_examples for u in ups], rnd)
        for n in LAYERS:
            assert torch.equal(momentum.factors[n].B, fedit.factors[n].B) and torch.equal(momentum.factors[n].A, fedit.factors[n].A)
        kept = mixed.client_keep(mixed.plan(0, rnd), ups[0])
        start = mixed.client_start(mixed.plan(0, rnd + 1), kept).init
        assert all(torch.equal(start[n].B, fedit.factors[n].B) and torch.equal(start[n].A, fedit.factors[n].A) for n in LAYERS)


def test_mixed_personal_starts_each_client_from_its_own_mix(gen):
    m = build_method("mixed-personal", _setup({0: 2, 1: 2}, alpha=0.25))
    ups = _uploads(m, gen, {0: 1, 1: 3}, 1)
    m.aggregate(ups, [1, 3], 1)
    kept = m.client_keep(m.plan(1, 1), ups[1])
    start = m.client_start(m.plan(1, 2), kept).init
    for n in LAYERS:
        g, own = m.factors[n], ups[1].factors[n]
        assert torch.allclose(start[n].B, 0.25 * own.B + 0.75 * g.B, rtol=0, atol=1e-14)
        assert torch.allclose(start[n].A, 0.25 * own.A + 0.75 * g.A, rtol=0, atol=1e-14)


def test_slot_mean_keeps_the_slots_no_client_trained_this_round(gen):
    """Only rank-1 clients in a round: slot 1 of a rank-2 federation keeps what it held; slot 0 is their mean."""
    m = build_method("slot-mean", _setup({0: 2, 1: 1, 2: 1}))
    before = {n: (f.B.clone(), f.A.clone()) for n, f in m.factors.items()}
    ups = _uploads(m, gen, {1: 2, 2: 6}, 1)
    m.aggregate(ups, [2, 6], 1)
    for n in LAYERS:
        f = m.factors[n]
        assert torch.equal(f.B[:, 1], before[n][0][:, 1]) and torch.equal(f.A[1], before[n][1][1])
        want = (2 * ups[0].factors[n].A[0] + 6 * ups[1].factors[n].A[0]) / 8
        assert torch.allclose(f.A[0], want, rtol=0, atol=1e-14)
