"""methods.md §3 item 13 for FedEx-LoRA, in float64: after every round the global model is the
FedAvg ideal (agg_noise 0, init_noise 0), the residual travels in its cheapest exact form, a
client that skipped rounds catches up to the same base, and equal clients add no residual."""

import pytest
import torch

from fedlora.federation.round import Arrival, bounds_of, finish_round, start_of
from fedlora.methods import MethodError, Setup
from fedlora.methods.base import ClientUpdate, Factors, plan_nbytes
from fedlora.methods.fedex import FedEx
from fedlora.ops.lowrank import Dense, LowRank
from fedlora.train.client import ClientState

from tests.conftest import rel_err

LAYERS = {"wide": (40, 36), "small": (5, 4)}  # rank-(K−1)·r residual: low-rank on "wide", dense on "small"
N, R, S = 6, 2, 2.0


def _fedex(**options) -> FedEx:
    return FedEx(Setup(LAYERS, {k: R for k in range(N)}, {k: S for k in range(N)}, seed=1, dtype=torch.float64, options=options))


def _dense(delta) -> dict[str, torch.Tensor]:
    return {n: sum(t.dense() for t in terms) for n, terms in delta.items()}


def _round(m, clients, gen, rnd, same=False):
    arrivals, first = [], None
    for k in clients:
        sent = m.plan(k, rnd)
        step = first if same and first is not None else {
            n: (torch.randn(f.B.shape, generator=gen, dtype=torch.float64), torch.randn(f.A.shape, generator=gen, dtype=torch.float64)) for n, f in sent.init.items()}
        first = first or step
        factors = {n: Factors(f.B + step[n][0], f.A + 0.3 * step[n][1]) for n, f in sent.init.items()}
        u = ClientUpdate(client=k, num_examples=2 + 3 * k, scale=S, factors=factors)
        arrivals.append(Arrival(sent, sent, u, start_of(m, sent)))
    before = _dense(m.global_delta())
    entry = finish_round(m, bounds_of(m, 1e9), rnd, "fedex", list(clients), 1, m.global_delta(), arrivals, lambda *a: None)
    return arrivals, before, entry


def test_the_global_model_is_the_fedavg_ideal_every_round(gen):
    m, ideal = _fedex(), {n: torch.zeros(s, dtype=torch.float64) for n, s in LAYERS.items()}
    for rnd, clients in enumerate([(0, 1, 2), (1, 3, 5), (0, 4), (2, 3, 4, 5)], start=1):
        arrivals, before, entry = _round(m, clients, gen, rnd)
        n = [a.update.num_examples for a in arrivals]
        p = [x / sum(n) for x in n]
        for name in LAYERS:  # M_k − G_t = s B_k A_k − s B̄ Ā: every client started at G_t
            ideal[name] = before[name] + sum(pk * (S * a.update.factors[name].B @ a.update.factors[name].A - S * a.sent.init[name].B @ a.sent.init[name].A)
                                             for pk, a in zip(p, arrivals))
            assert rel_err(_dense(m.global_delta())[name], ideal[name]) < 1e-12
        assert entry["agg_noise"] < 1e-12 and entry["init_noise"] < 1e-12


def test_the_residual_takes_its_cheapest_exact_form_and_counts_on_the_wire(gen):
    m = _fedex()
    arrivals, _, _ = _round(m, (0, 1, 2), gen, 1)
    merge = m.merged.recent
    (v, wide), = merge["wide"]
    (_, small), = merge["small"]
    assert isinstance(wide, LowRank) and wide.rank == 2 * R  # (K−1)·r (d_out + d_in) < d_out·d_in, K = 3
    assert isinstance(small, Dense)  # 2·2·(5 + 4) ≥ 5·4
    p = [a.update.num_examples / sum(x.update.num_examples for x in arrivals) for a in arrivals]
    for name, term in (("wide", wide), ("small", small)):
        fs = [a.update.factors[name] for a in arrivals]
        B_bar, A_bar = sum(pk * f.B for pk, f in zip(p, fs)), sum(pk * f.A for pk, f in zip(p, fs))
        want = S * sum(pk * f.B @ f.A for pk, f in zip(p, fs)) - S * B_bar @ A_bar
        assert rel_err(term.dense(), want) < 1e-12
    plan = m.plan(0, 2)  # up to date after round 1 but one merge behind: exactly that residual
    residual_bytes = 8 * (wide.size + small.size)
    assert residual_bytes == 8 * (2 * R * (40 + 36) + 5 * 4)
    adapter_bytes = 8 * R * sum(o + i for o, i in LAYERS.values())
    assert plan_nbytes(plan) == residual_bytes + adapter_bytes


def test_a_client_that_skipped_rounds_catches_up_to_the_same_base(gen):
    m, away = _fedex(), ClientState()
    for rnd, clients in enumerate([(0, 1), (1, 2), (0, 2), (1, 2)], start=1):
        _round(m, clients, gen, rnd)
    plan = m.plan(5, 5)  # client 5 never took part
    away.catch_up(plan)
    server = _dense(m.base_delta())
    assert all(rel_err(sum(t.dense() for t in away.delta()[n]), server[n]) < 1e-14 for n in LAYERS)


def test_equal_clients_add_no_residual(gen):
    m = _fedex(weights="uniform")
    _round(m, (0, 1, 2, 3), gen, 1, same=True)
    assert m.merged.version == 1 and m.merged.recent == {"wide": [], "small": []}  # nothing merged, nothing to send
    assert all(terms == [] for terms in m.base_delta().values())
    plan = m.plan(0, 2)
    assert plan.base.version == 1 and all(terms == [] for d in (plan.base.merges, plan.base.reset) for terms in d.values())
    assert plan_nbytes(plan) == 8 * R * sum(o + i for o, i in LAYERS.values())  # the adapter (B̄, Ā) alone
    assert plan_nbytes(m.plan(5, 2)) == plan_nbytes(plan)  # a client that never took part: an empty reset


def test_one_rank_is_required():
    with pytest.raises(MethodError, match="'fedex' needs one rank"):
        FedEx(Setup(LAYERS, {0: 2, 1: 1}, {0: 2.0, 1: 2.0}))


def _direct(m, K, gen, pk, same_A=False, zero_weight=()):
    """K float64 uploads of rank R with weights ∝ pk, straight into aggregate(); the dense residual it must merge."""
    ups = []
    A0 = {n: torch.randn(R, i, generator=gen, dtype=torch.float64) for n, (_, i) in LAYERS.items()}
    for k in range(K):
        factors = {n: Factors(torch.randn(o, R, generator=gen, dtype=torch.float64),
                              A0[n].clone() if same_A else torch.randn(R, i, generator=gen, dtype=torch.float64)) for n, (o, i) in LAYERS.items()}
        ups.append(ClientUpdate(client=k, num_examples=0 if k in zero_weight else pk[k], scale=S, factors=factors))
    w = [float(u.num_examples) for u in ups]
    p = [x / sum(w) for x in w]
    dense = {}
    for n in LAYERS:
        B_bar = sum(q * u.factors[n].B for q, u in zip(p, ups))
        A_bar = sum(q * u.factors[n].A for q, u in zip(p, ups))
        dense[n] = S * sum(q * u.factors[n].B @ u.factors[n].A for q, u in zip(p, ups)) - S * B_bar @ A_bar  # Σ p_k s B_k A_k − s B̄Ā
    m.aggregate(ups, w, 1)
    return dense


@pytest.mark.parametrize("K", [2, 3, 5])
def test_the_residual_has_rank_K_minus_one_times_r_and_equals_the_dense_one(gen, K):
    """Σ_k p_k (B_k − B̄) = 0 makes one of the K centred pairs redundant: rank (K−1)·r, exact to round-off."""
    m = _fedex()
    dense = _direct(m, K, gen, [3, 7, 1, 4, 9][:K])
    (_, wide), = m.merged.recent["wide"]
    assert isinstance(wide, LowRank) and wide.rank == (K - 1) * R
    assert wide.B.shape == (40, (K - 1) * R) and wide.A.shape == ((K - 1) * R, 36)
    assert rel_err(wide.dense(), dense["wide"]) < 1e-12
    (_, small), = m.merged.recent["small"]
    assert rel_err(small.dense(), dense["small"]) < 1e-12  # dense (or (K−1)·r) form, the same matrix
    assert small.size == min((K - 1) * R * (5 + 4), 5 * 4)


def test_a_client_of_weight_zero_adds_no_rank(gen):
    m = _fedex()
    dense = _direct(m, 4, gen, [3, 7, 1, 4], zero_weight=(1,))
    (_, wide), = m.merged.recent["wide"]
    assert wide.rank == 2 * R and rel_err(wide.dense(), dense["wide"]) < 1e-12  # 3 clients of positive weight


def test_equal_A_factors_add_no_residual(gen):
    """Σ p_k B_k A − B̄ A = 0 exactly in exact arithmetic: nothing is merged (FedIT is exact there)."""
    m = _fedex()
    dense = _direct(m, 3, gen, [3, 7, 1], same_A=True)
    assert m.merged.recent == {"wide": [], "small": []}
    scale = float(torch.linalg.norm(S * m.factors["wide"].B @ m.factors["wide"].A))
    assert float(torch.linalg.norm(dense["wide"])) <= 1e-14 * scale  # the dense residual is round-off too
