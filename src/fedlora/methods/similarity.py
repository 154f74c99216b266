"""How alike the clients' one-rank modules are after a Fed-PLoRA round (the paper's Figure 2).

Client k uploads, per layer, the modules j ∈ K_k it trained: (b_j^k, a_j^k), b ∈ R^{d_out},
a ∈ R^{d_in}, with K_k in ``update.meta["indices"]``. A module's weight is the rank-one matrix
b aᵀ, and the cosine of two of them is a product of two vector cosines:

    cos(b aᵀ, b' a'ᵀ) = ⟨b aᵀ, b' a'ᵀ⟩_F / (‖b aᵀ‖_F ‖b' a'ᵀ‖_F) = cos(b, b') · cos(a, a'),

which is blind to the sign flip (b, a) → (−b, −a). Over every pair of modules from two
different clients: ``within`` averages the pairs with the same index j, ``cross`` those with
different indices; both are averaged over pairs per layer, then over layers (pair counts
are per layer). Modules of the
same index should grow alike while different indices stay apart.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedlora.methods.base import ClientUpdate


def module_similarity(updates: Sequence[ClientUpdate]) -> dict[str, float | int | None]:
    """Layer-averaged within-index and cross-index module cosine similarity (None: no such pair)."""
    tagged = [(u, u.meta["indices"].to(torch.int64)) for u in updates if "indices" in u.meta]
    if not tagged:
        return {"within": None, "cross": None, "pairs_within": 0, "pairs_cross": 0}
    index = torch.cat([K for _, K in tagged])  # (M,), M = Σ r_k: every uploaded module's index
    owner = torch.cat([torch.full((K.numel(),), i) for i, (_, K) in enumerate(tagged)])
    other_client = owner[:, None] != owner[None, :]
    same = other_client & (index[:, None] == index[None, :])  # (M × M) pair masks, same on every layer
    diff = other_client & (index[:, None] != index[None, :])
    within, cross = [], []
    for name in tagged[0][0].factors:
        b = torch.cat([_unit(u.factors[name].B.T) for u, _ in tagged])  # (M × d_out)
        a = torch.cat([_unit(u.factors[name].A) for u, _ in tagged])  # (M × d_in)
        cos = (b @ b.T) * (a @ a.T)  # (M × M)
        if same.any():
            within.append(float(cos[same].mean()))
        if diff.any():
            cross.append(float(cos[diff].mean()))
    return {
        "within": sum(within) / len(within) if within else None,
        "cross": sum(cross) / len(cross) if cross else None,
        "pairs_within": int(same.sum()) // 2,
        "pairs_cross": int(diff.sum()) // 2,
    }


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length in float64; a zero row stays zero (cosine 0 with everything)."""
    rows = rows.to(torch.float64)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)
