"""Zero-padding: the heterogeneous-rank baseline of the FLoRA paper (Wang et al., NeurIPS 2024, §3).

Every round each sampled client trains a fresh LoRA of its own rank r_k on the current merged
base, like FLoRA. The server pads A_k (r_k × d_in) with zero rows and B_k (d_out × r_k) with
zero columns to R = max_k r_k (per layer, over every client of the setup), averages each factor
separately and merges the product into the base:

    B̄ = Σ_k p_k pad(s_k B_k)   (d_out × R),    Ā = Σ_k p_k pad(A_k)   (R × d_in),
    W_{t+1} = W_t + B̄ Ā.

Padding alone changes nothing (pad(B) pad(A) = B A), but the product of the means holds the
cross-client terms Σ_{j≠k} p_j p_k s_j pad(B_j) pad(A_k), so unlike FLoRA the merge is not
Σ p_k s_k B_k A_k; with equal ranks and scales it is FedIT's s·B̄Ā (methods.md §1, §3 item 6).
The merged base lives in a MergedBase, so partial participation works exactly as in FLoRA: a
client that skipped rounds receives the merges it missed or, when cheaper, the whole G_t − W_0.
"""

from __future__ import annotations

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Setup
from fedlora.methods.reference import padded_means
from fedlora.methods.registry import register
from fedlora.methods.folding import Folds, Sum
from fedlora.methods.merged_base import MergedBase
from fedlora.methods.options import read_options, weighting, WEIGHTING
from fedlora.ops.lowrank import LowRank, smallest_form


@register
class ZeroPad(Folds):
    name = "zeropad"
    summary = "Zero-pad every client's factors to the largest rank, average A and B separately, merge B̄Ā; fresh adapters each round."

    options = {
        **WEIGHTING,
    }

    state_keys = ("merged.total.version", "merged.total.layers", "merged.recent", "merged.synced")
    exact = False  # the product of the padded means holds cross-client terms
    merges = True
    sums_only = False  # sums of padded factors: sums-only once clients upload them padded to R (the uploads differ in shape now)
    reference = padded_means

    def __init__(self, setup: Setup) -> None:
        opts = read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.weighting = weighting(self.name, opts)
        self.merged = MergedBase(setup.layers, setup.dtype)
        # R per layer: the largest rank any client of the setup trains on that layer
        self.max_rank: dict[str, int] = {name: max(setup.rank_of(k, name) for k in setup.ranks) for name in setup.layers}

    def plan(self, client: int, round: int) -> ClientPlan:
        return self.merged.fresh_plan(self.setup, client, round)

    def begin(self, round: int) -> Sum:
        return Sum(round)

    def fold(self, acc: Sum, u: ClientUpdate, weight: float) -> None:
        """Add w_k pad(s_k B_k) and w_k pad(A_k) into the layer's rank-R sums, in place."""
        w = self.weighting.weigh(weight)
        acc.add(u.client, w)
        for name, (d_out, d_in) in self.setup.layers.items():
            f, R = u.factors[name], self.max_rank[name]
            if name not in acc.layers:
                acc.layers[name] = (torch.zeros(d_out, R, dtype=self.setup.dtype), torch.zeros(R, d_in, dtype=self.setup.dtype))
            B_sum, A_sum = acc.layers[name]
            B_sum[:, : f.rank].add_(f.B.to(B_sum.dtype), alpha=w * u.scale)  # Σ w_k pad(s_k B_k): (d_out × R)
            A_sum[: f.rank].add_(f.A.to(A_sum.dtype), alpha=w)  # Σ w_k pad(A_k): (R × d_in)

    def commit(self, acc: Sum) -> None:
        """Merge B̄Ā with B̄ = Σ w_k pad(s_k B_k) / Σ w_k, Ā = Σ w_k pad(A_k) / Σ w_k."""
        norm = acc.norm()
        merged = {name: smallest_form(LowRank(B.mul_(norm), A.mul_(norm))) for name, (B, A) in acc.layers.items()}
        self.merged.merge(merged, acc.clients)

    def global_delta(self) -> Delta:
        return self.merged.delta()
