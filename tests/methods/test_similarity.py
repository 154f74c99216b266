"""Module cosine similarity across clients (Fed-PLoRA Figure 2) on hand-made float64 modules."""

import math

import pytest
import torch

from fedlora.methods.base import ClientUpdate, Factors
from fedlora.methods.similarity import module_similarity


def _update(client: int, indices: list[int], bs: list[list[float]], as_: list[list[float]]) -> ClientUpdate:
    """One layer 'L': B's columns are the b_j, A's rows the a_j, in the order of ``indices``."""
    f = Factors(B=torch.tensor(bs, dtype=torch.float64).T, A=torch.tensor(as_, dtype=torch.float64))
    return ClientUpdate(client=client, num_examples=1, scale=1.0, factors={"L": f}, meta={"indices": torch.tensor(indices)})


def test_hand_computed_within_and_cross():
    # client 0 trains modules 0 and 1, client 1 trains modules 1 and 2
    u0 = _update(0, [0, 1], bs=[[1, 0], [0, 1]], as_=[[1, 0, 0], [0, 1, 0]])
    u1 = _update(1, [1, 2], bs=[[0, 2], [1, 1]], as_=[[0, -3, 0], [1, 0, 1]])
    s = module_similarity([u0, u1])
    # same index: (0,j=1) vs (1,j=1): cos b = 1, cos a = -1 → -1; the only within pair
    assert s["within"] == pytest.approx(-1.0, abs=1e-15) and s["pairs_within"] == 1
    # cross pairs: (0,0)-(1,1): 0·0 = 0; (0,0)-(1,2): (1/√2)(1/√2) = 1/2; (0,1)-(1,2): (1/√2)·0 = 0
    assert s["cross"] == pytest.approx(0.5 / 3, abs=1e-15) and s["pairs_cross"] == 3


def test_sign_flip_is_invisible_and_layers_are_averaged():
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(4, 2, generator=gen, dtype=torch.float64), torch.randn(2, 5, generator=gen, dtype=torch.float64)
    idx = torch.tensor([0, 1])
    twin = {"L1": Factors(B=b, A=a), "L2": Factors(B=b, A=a)}
    flipped = {"L1": Factors(B=-b, A=-a), "L2": Factors(B=torch.randn(4, 2, generator=gen, dtype=torch.float64), A=a)}
    s = module_similarity([
        ClientUpdate(0, 1, 1.0, twin, meta={"indices": idx}), ClientUpdate(1, 1, 1.0, flipped, meta={"indices": idx.clone()}),
    ])
    cos_b = torch.nn.functional.cosine_similarity(b.T, flipped["L2"].B.T, dim=1)  # per module, layer L2
    expected_l2 = float(cos_b.mean())  # cos a = 1 for both modules on L2
    assert s["within"] == pytest.approx((1.0 + expected_l2) / 2, abs=1e-14)


def test_no_pairs_gives_none():
    one = _update(0, [0, 1], bs=[[1, 0], [0, 1]], as_=[[1, 0, 0], [0, 1, 0]])
    s = module_similarity([one])
    assert s == {"within": None, "cross": None, "pairs_within": 0, "pairs_cross": 0}
    disjoint = module_similarity([one, _update(1, [2], bs=[[1, 0]], as_=[[1, 0, 0]])])
    assert disjoint["within"] is None and disjoint["cross"] == pytest.approx(0.5, abs=1e-15)
    assert not math.isnan(disjoint["cross"])
