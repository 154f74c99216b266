import pytest
import torch

from fedlora.ops.lowrank import LowRank, compress, frob_norm, frob_norm_gram, lowrank_svd, pad, stack, truncate
from fedlora.ops.weights import data_weights

from tests.conftest import rel_err


def _terms(gen, shapes=((40, 3), (40, 5), (40, 1)), d_in=30):
    return [LowRank(torch.randn(d, r, generator=gen, dtype=torch.float64), torch.randn(r, d_in, generator=gen, dtype=torch.float64)) for d, r in shapes]


def test_stack_product_is_sum_of_products(gen):
    terms = _terms(gen)
    s = stack(terms)
    assert s.B.shape == (40, 9) and s.A.shape == (9, 30)
    assert rel_err(s.dense(), sum(t.dense() for t in terms)) < 1e-13


def test_pad_keeps_product_and_truncate_inverts_it(gen):
    (t,) = _terms(gen, ((20, 3),), 10)
    B, A = pad(t.B, t.A, 7)
    assert B.shape == (20, 7) and A.shape == (7, 10)
    assert torch.equal(B @ A, t.B @ t.A) or rel_err(B @ A, t.dense()) < 1e-14
    B2, A2 = truncate(B, A, 3)
    assert torch.equal(B2, t.B) and torch.equal(A2, t.A)


def test_frob_norm_matches_dense_and_gram(gen):
    terms = _terms(gen)
    dense = float(torch.linalg.matrix_norm(sum(t.dense() for t in terms)))
    assert abs(frob_norm(terms) - dense) / dense < 1e-12
    assert abs(frob_norm_gram(terms) - dense) / dense < 1e-12


def test_frob_norm_of_cancelling_terms_is_roundoff(gen):
    (t,) = _terms(gen, ((50, 4),), 60)
    assert frob_norm([t, t.scaled(-1.0)]) < 1e-12 * frob_norm([t])


def test_frob_norm_when_rank_exceeds_dimension(gen):
    terms = _terms(gen, ((6, 4), (6, 5)), 8)  # Σr = 9 > min(6, 8): dense branch
    dense = float(torch.linalg.matrix_norm(sum(t.dense() for t in terms)))
    assert abs(frob_norm(terms) - dense) / dense < 1e-12


def test_lowrank_svd_equals_dense_svd(gen):
    terms = _terms(gen)
    u, s, vh = lowrank_svd(terms)
    dense = sum(t.dense() for t in terms)
    s_dense = torch.linalg.svdvals(dense)
    assert rel_err(s, s_dense[: s.numel()]) < 1e-12
    assert rel_err(u @ torch.diag(s) @ vh, dense) < 1e-12
    assert rel_err(vh @ vh.T, torch.eye(vh.shape[0], dtype=torch.float64)) < 1e-12


def test_compress_is_exact_and_small(gen):
    terms = _terms(gen)
    c = compress(terms + [terms[0].scaled(-1.0)], rtol=1e-12)  # rank drops back to 6
    assert c.rank == 6
    assert rel_err(c.dense(), terms[1].dense() + terms[2].dense()) < 1e-12


def test_data_weights_nonnegative_and_sum_to_one():
    w = data_weights([3, 0, 7, 10])
    assert all(x >= 0 for x in w) and abs(sum(w) - 1) < 1e-15
    assert w == [3 / 20, 0.0, 7 / 20, 10 / 20]
    assert data_weights([0, 0]) == [0.5, 0.5]


def test_a_delta_survives_its_flat_tensor_form_bit_for_bit():
    from fedlora.ops.delta_tensors import delta_to_tensors, tensors_to_delta
    from fedlora.ops.lowrank import Dense, LowRank

    g = torch.Generator().manual_seed(0)
    delta = {"a.q": [LowRank(torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g)), Dense(torch.randn(4, 3, generator=g))],
             "b.v": [LowRank(torch.randn(2, 1, generator=g), torch.randn(1, 3, generator=g))]}
    for prefix in ("", "merges"):
        flat = delta_to_tensors(delta, prefix)
        assert all(k.startswith(f"{prefix}/" if prefix else "") for k in flat)
        back = tensors_to_delta({**flat, "other/x/0/W": torch.ones(1, 1)} if prefix else flat, prefix)
        assert back.keys() == delta.keys()
        for n, terms in delta.items():
            assert [type(t) for t in back[n]] == [type(t) for t in terms]
            assert all(all(x.equal(y) for x, y in zip(t.tensors(), u.tensors())) for t, u in zip(terms, back[n]))
    with pytest.raises(ValueError, match="incomplete"):
        tensors_to_delta({"a/0/B": torch.ones(2, 1)})
