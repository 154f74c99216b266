"""FLoRA: stacking-based heterogeneous LoRA aggregation (Wang et al., NeurIPS 2024).

Server: A_stack = [s_1 p_1 A_1; …; s_K p_K A_K] (Σr_k × d_in), B_stack = [B_1 … B_K]
(d_out × Σr_k), same client order, so B_stack A_stack = Σ p_k s_k B_k A_k exactly. The stack
is merged into every client's frozen base, and each round starts fresh adapters on it.

The server keeps the per-round stacks: a client that skipped rounds receives every stack it
missed, in order, before it trains (partial participation), and that counts in its downlink.
A stack wider than its layer (Σr_k > min(d_out, d_in), many clients on a small model) is kept
as the same matrix at rank min(d_out, d_in), by a float64 thin SVD (``within_layer_rank``).
"""

from __future__ import annotations

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Setup
from fedlora.methods.options import Option, read_options
from fedlora.methods.merged_base import MergedBase
from fedlora.ops.lowrank import LowRank, stack, within_layer_rank


class FLoRA:
    name = "flora"
    summary = "Stack the clients' factors so the merge equals Σ p_k s_k B_k A_k exactly; fresh adapters each round."

    options = {
        "weights": Option("data", "p_k from example counts (data) or 1/K (uniform)", choices=("data", "uniform")),
        "scaling": Option(1.0, "multiplier c on every p_k (the paper's scaling-factor study); c ≠ 1 is inexact by |c − 1|", low=0.0),
    }

    state_keys = ("base.history", "base.synced")

    def __init__(self, setup: Setup) -> None:
        opts = read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.uniform = opts["weights"] == "uniform"
        self.scaling = float(opts["scaling"])
        self.base = MergedBase(setup.layers)

    def plan(self, client: int, round: int) -> ClientPlan:
        return self.base.fresh_plan(self.setup, client, round)

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> None:
        if self.uniform:
            weights = [1.0 / len(updates)] * len(updates)
        merged: Delta = {}
        for name in self.setup.layers:
            terms = [
                LowRank(u.factors[name].B, u.factors[name].A * (u.scale * p * self.scaling))  # (d_out×r_k), (r_k×d_in)
                for u, p in zip(updates, weights)
            ]
            merged[name] = [within_layer_rank(stack(terms))]  # (d_out × Σr_k) @ (Σr_k × d_in); rank ≤ min(d_out, d_in)
        self.base.merge(merged, [u.client for u in updates])

    def global_delta(self) -> Delta:
        return self.base.delta()
