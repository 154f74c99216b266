"""FLoRA: stacking-based heterogeneous LoRA aggregation (Wang et al., NeurIPS 2024).

Server: A_stack = [s_1 p_1 A_1; …; s_K p_K A_K] (Σr_k × d_in), B_stack = [B_1 … B_K]
(d_out × Σr_k), same client order, so B_stack A_stack = Σ p_k s_k B_k A_k exactly. The stack
is merged into every client's frozen base, and each round starts fresh adapters on it.

The merged base lives in a ``MergedBase``, bounded in the number of rounds (methods.md §4): a
client that skipped rounds is sent the merges it missed or, once that is the larger message,
the whole G_t − W_0, before it trains (partial participation), and that counts in its downlink.
While a round's replies fold in, a stack wider than twice its layer's rank is compressed by a
float64 thin SVD (``within_layer_rank``). The merge is kept and sent as its own thin SVD with canonical
signs (``sum_only_form``), never as the stack: the stack would show every client's B_k and A_k to every
other client, the SVD shows only Σ p_k s_k B_k A_k, at its rank (≤ Σr_k), exact to float64 round-off, and
dense once that is smaller (Σr_k (d_out + d_in) ≥ d_out d_in).
"""

from __future__ import annotations

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Setup
from fedlora.methods.reference import ideal
from fedlora.methods.registry import register
from fedlora.methods.options import Option, read_options, weighting, WEIGHTING
from fedlora.methods.folding import Folds, Sum
from fedlora.methods.merged_base import MergedBase
from fedlora.ops.lowrank import LowRank, stack, sum_only_form, within_layer_rank


@register
class FLoRA(Folds):
    name = "flora"
    summary = "Stack the clients' factors so the merge equals Σ p_k s_k B_k A_k exactly; fresh adapters each round."

    options = {
        **WEIGHTING,
        "scaling": Option(1.0, "multiplier c on every p_k (the paper's scaling-factor study); c ≠ 1 is inexact by |c − 1|", low=0.0),
    }

    state_keys = ("merged.total.version", "merged.total.layers", "merged.recent", "merged.synced")
    exact = True  # the stack is Σ p_k s_k B_k A_k (with ``scaling`` c = 1)
    merges = True
    sums_only = False  # the product sums need each client's own B_k and A_k
    reference = ideal

    def __init__(self, setup: Setup) -> None:
        opts = read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.weighting = weighting(self.name, opts)
        self.scaling = float(opts["scaling"])
        if self.scaling != 1.0:
            self.exact = False  # c ≠ 1 scales the merge away from the ideal by |c − 1|
        self.merged = MergedBase(setup.layers, setup.dtype)

    def plan(self, client: int, round: int) -> ClientPlan:
        return self.merged.fresh_plan(self.setup, client, round)

    def begin(self, round: int) -> Sum:
        return Sum(round, {name: [] for name in self.setup.layers})

    def fold(self, acc: Sum, u: ClientUpdate, weight: float) -> None:
        """Note (B_k, A_k, s_k w_k c) per layer, the upload itself (no copy); a stack past twice its layer's rank is compressed.

        An upload in another dtype than the state's (a bfloat16 upload into a float32 state) is cast
        to the state's dtype here, before its coefficient scales it: scaled in bfloat16, p_k s_k A_k
        would lose ~1e-3 of itself. In the state's dtype ``to`` is the upload itself.
        """
        w = self.weighting.weigh(weight)
        acc.add(u.client, w)
        dt = self.setup.dtype
        for name, (d_out, d_in) in self.setup.layers.items():
            f, pending = u.factors[name], acc.layers[name]
            pending.append((f.B.to(dt), f.A.to(dt), u.scale * w * self.scaling))  # (d_out×r_k), (r_k×d_in), its coefficient
            if sum(B.shape[1] for B, _, _ in pending) > 2 * min(d_out, d_in):
                t = within_layer_rank(stacked(pending, 1.0))
                acc.layers[name] = [(t.B, t.A, 1.0)]

    def commit(self, acc: Sum) -> None:
        """Merge Σ_k w_k s_k c B_k A_k / Σ_k w_k per layer, in the form that reveals only that sum."""
        norm = acc.norm()
        merged = {name: sum_only_form(stacked(pending, norm)) for name, pending in acc.layers.items()}  # the sum alone goes down
        self.merged.merge(merged, acc.clients)

    def global_delta(self) -> Delta:
        return self.merged.delta()


def stacked(pending: list[tuple[torch.Tensor, torch.Tensor, float]], norm: float) -> LowRank:
    """[B_1 … B_K], [c_1 n A_1; …; c_K n A_K]: the noted uploads with their coefficients, stacked in one pass."""
    return stack([LowRank(B, A) for B, A, _ in pending], [c * norm for _, _, c in pending])
