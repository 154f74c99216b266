"""FLoRIST: FLoRA's stack compressed by singular-value thresholding (Ramesh & Dass, MLSys 2026,
arXiv 2506.09199).

The round's stack B_stack A_stack = Σ_k p_k s_k B_k A_k is built as FLoRA builds it; its thin
SVD U S Vᵀ comes from the stacked factors (QR of each, SVD of the Σr × Σr core: never the dense
matrix; in the state's dtype, float32 or better, as FlexLoRA's), and per layer the smallest rank p whose singular values hold a fraction τ of the
energy Σσ² is kept (option ``energy``):

    p = min { p : Σ_{i≤p} σ_i² ≥ τ Σ_i σ_i² },    merge = (U_p S_p)(V_pᵀ).

Every client downloads that one rank-p pair (not the Σr stack), merges it into its base and
starts a fresh adapter at its own rank, as in FLoRA (the paper's code merges the pair and
re-attaches fresh LoRA; so heterogeneous ranks are accepted). The paper tunes τ per model and
dataset in 0.80–0.99: FLoRIST-O (best quality) used 0.85–0.99, FLoRIST-E (fewest bytes)
0.80–0.87. What the threshold drops is measured every round: ``florist.dropped_energy`` (the
share of Σσ² dropped, over all layers) and ``agg_noise`` = sqrt of that share.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlora.methods.base import ClientUpdate, Setup
from fedlora.methods.reference import energy_truncated
from fedlora.methods.registry import register
from fedlora.methods.flora import FLoRA, stacked
from fedlora.methods.folding import Sum
from fedlora.methods.merged_base import MergedBase
from fedlora.methods.options import Option, read_options, weighting, WEIGHTING
from fedlora.ops.lowrank import LowRank, canonical_signs, lowrank_svd, smallest_form

DEFAULT_ENERGY = 0.95


def energy_rank(sv: torch.Tensor, energy: float) -> int:
    """The smallest p ≥ 1 with Σ_{i≤p} σ_i² ≥ τ Σ σ_i² (σ sorted descending)."""
    sq = sv.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq, 0)
    return min(sv.numel(), int((cum < energy * total).sum()) + 1)


@register
class FLoRIST(FLoRA):
    name = "florist"
    summary = "FLoRA's stack truncated by SVD to the rank holding a fraction τ of its energy; one rank-p pair downloaded."
    exact = False  # the threshold τ < 1 drops energy (τ = 1 is FLoRA's merge, exact)
    reference = energy_truncated

    options = {
        **WEIGHTING,
        "energy": Option(DEFAULT_ENERGY, "τ: the share of Σσ² the kept rank p must hold (the paper: 0.80–0.99)", low=0.0, high=1.0),
    }

    def __init__(self, setup: Setup) -> None:
        opts = read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.weighting = weighting(self.name, opts)
        self.scaling = 1.0
        self.energy = float(opts["energy"])
        self.merged = MergedBase(setup.layers, setup.dtype)
        self.last: dict[str, Any] = {}

    def commit(self, acc: Sum) -> None:
        """Truncate each layer's stack to its energy rank p (SVD in the state's dtype, float32 or better), merge the rank-p pair."""
        norm = acc.norm()
        merged, ranks, kept_sq, total_sq = {}, {}, 0.0, 0.0
        work = torch.promote_types(self.setup.dtype, torch.float32)
        for name, pending in acc.layers.items():
            t = stacked(pending, norm)
            u, sv, vh = lowrank_svd([t.to(work)])
            p = energy_rank(sv, self.energy)
            ranks[name] = p
            kept_sq += float((sv[:p].double() ** 2).sum())
            total_sq += float((sv.double() ** 2).sum())
            u_p, vh_p = canonical_signs(u[:, :p], vh[:p])  # signs fixed by the sum alone, not by how it was stacked
            merged[name] = smallest_form(LowRank((u_p * sv[:p]).to(self.setup.dtype), vh_p.to(self.setup.dtype)))
        self.merged.merge(merged, acc.clients)
        dropped = (total_sq - kept_sq) / total_sq if total_sq > 0 else 0.0
        self.last = {"rank_mean": sum(ranks.values()) / len(ranks), "rank_max": max(ranks.values()), "dropped_energy": max(dropped, 0.0)}

    def round_metrics(self, updates: list[ClientUpdate]) -> dict[str, Any]:
        """The kept rank p (mean and max over layers) and the dropped share of the energy."""
        return {"florist": dict(self.last)}
