"""What a client receives from FLoRA and FedEx reveals the sum of the clients' updates and nothing of any one client
(methods.md §5): the merge travels as the thin SVD of the sum with canonical signs, never as the stack (float64)."""

from __future__ import annotations

import pytest
import torch

from fedlora.methods import Setup, build_method
from fedlora.methods.base import ClientUpdate, Factors
from fedlora.ops.lowrank import LowRank, sum_only_form

from tests.conftest import rel_err

LAYERS = {"l0.q": (40, 30), "l0.v": (6, 10)}  # q travels low-rank (Σr (d_out + d_in) < d_out d_in), v dense
SCALE = 2.0


def _updates(ranks, counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [ClientUpdate(k, n, SCALE, {name: Factors(torch.randn(d_out, r, generator=gen, dtype=torch.float64),
                                                   torch.randn(r, d_in, generator=gen, dtype=torch.float64))
                                       for name, (d_out, d_in) in LAYERS.items()})
            for k, (r, n) in enumerate(zip(ranks, counts))]


def _reshaped(updates, seed=1, mix=True):
    """The same weighted sum from other clients: clients 1 and 2 (equal weights) swapped and, with ``mix``, client 0's
    factors through a random invertible G, (B G)(G⁻¹ A) (FLoRA's sum of products; FedEx's averages of factors would move)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for u in updates:
        factors = {}
        for name, f in u.factors.items():
            if u.client == 0 and mix:
                G = torch.randn(f.rank, f.rank, generator=gen, dtype=torch.float64) + 3 * torch.eye(f.rank, dtype=torch.float64)
                factors[name] = Factors(f.B @ G, torch.linalg.solve(G, f.A))
            else:
                factors[name] = f
        out.append(ClientUpdate(u.client, u.num_examples, u.scale, factors))
    out[1], out[2] = ClientUpdate(1, out[2].num_examples, SCALE, out[2].factors), ClientUpdate(2, out[1].num_examples, SCALE, out[1].factors)
    return out


def _downlink(name, ranks, updates, counts):
    """What client 0 receives before round 2: every tensor of its plan's base update, per layer."""
    m = build_method(name, Setup(LAYERS, dict(enumerate(ranks)), {k: SCALE for k in range(len(ranks))}, seed=0, dtype=torch.float64))
    for k in range(len(ranks)):
        m.plan(k, 1)
    m.aggregate(updates, counts, 1)
    base = m.plan(0, 2).base
    sent = {**base.merges, **base.reset}
    return m, {layer: [t for term in terms for t in term.tensors()] for layer, terms in sent.items()}


@pytest.mark.parametrize(("name", "ranks"), [("flora", [3, 2, 1]), ("fedex", [2, 2, 2])])
def test_clients_with_another_split_of_the_same_sum_send_every_client_the_same_downlink(name, ranks):
    """Two federations whose clients' updates differ (two clients swapped; for FLoRA also one client's factors mixed by
    G) but whose sums are equal send the same tensors down, to round-off: nothing in them tells the splits apart. For
    FedEx the server's reference client and the order of its centred pairs differ between the two."""
    counts = [10, 25, 25]
    first = _updates(ranks, counts)
    m, a = _downlink(name, ranks, first, counts)
    _, b = _downlink(name, ranks, _reshaped(first, mix=name == "flora"), counts)
    assert a.keys() == b.keys() == set(LAYERS)
    for layer in LAYERS:
        assert [t.shape for t in a[layer]] == [t.shape for t in b[layer]], layer
        assert all(rel_err(x, y) < 1e-10 for x, y in zip(a[layer], b[layer])), layer
        if name == "flora":  # the stacks the server summed differ by O(1): the old wire form would tell them apart
            stack_a = torch.cat([u.factors[layer].B for u in first], dim=1)
            stack_b = torch.cat([u.factors[layer].B for u in _reshaped(first)], dim=1)
            assert rel_err(stack_a, stack_b) > 0.1


def test_no_client_factor_can_be_read_off_a_flora_merge_and_the_merge_is_the_exact_sum():
    """The merge's B has orthogonal columns spanning the sum's column space: no column is any client's B_k column (as
    the stack's first r_0 columns were), and B'A' = Σ p_k s_k B_k A_k to float64 round-off, at the sum's rank."""
    ranks, counts = [3, 2, 1], [10, 30, 60]
    updates = _updates(ranks, counts)
    m, sent = _downlink("flora", ranks, updates, counts)
    p = [n / sum(counts) for n in counts]
    for layer, (d_out, d_in) in LAYERS.items():
        want = sum(pk * SCALE * u.factors[layer].B @ u.factors[layer].A for pk, u in zip(p, updates))
        B, A = sent[layer] if len(sent[layer]) == 2 else (sent[layer][0], None)
        if A is None:  # dense: the matrix itself
            assert rel_err(B, want) < 1e-13
            continue
        assert rel_err(B @ A, want) < 1e-13 and B.shape[1] == int(torch.linalg.matrix_rank(want))
        cols = B / B.norm(dim=0)
        assert torch.allclose(cols.T @ cols, torch.eye(B.shape[1], dtype=torch.float64), atol=1e-12)  # U S: orthogonal columns
        for u in updates:
            own = u.factors[layer].B / u.factors[layer].B.norm(dim=0)
            assert float((own.T @ cols).abs().max()) < 0.999, "a client's B column went down as it was"


def test_sum_only_form_is_the_product_with_canonical_signs_whatever_the_stack():
    gen = torch.Generator().manual_seed(3)
    B, A = torch.randn(40, 5, generator=gen, dtype=torch.float64), torch.randn(5, 30, generator=gen, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    one, two = sum_only_form(LowRank(B, A)), sum_only_form(LowRank(B @ Q, Q.T @ A))
    assert rel_err(one.B @ one.A, B @ A) < 1e-13 and one.rank == 5
    assert rel_err(one.B, two.B) < 1e-12 and rel_err(one.A, two.A) < 1e-12
    rows = one.B.abs().argmax(dim=0)
    assert bool((one.B[rows, torch.arange(5)] > 0).all())  # each pair's largest entry of U positive
    Bs, As = torch.cat([B, B[:, :2]], dim=1), torch.cat([A, 0.5 * A[:2]], dim=0)  # a stack of 7 columns, of rank 5
    low = sum_only_form(LowRank(Bs, As))
    assert low.rank == 5 and rel_err(low.B @ low.A, Bs @ As) < 1e-13  # the numerical rank, never wider than needed
