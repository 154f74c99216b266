"""FLoRA: stacking-based heterogeneous LoRA aggregation (Wang et al., NeurIPS 2024).

Server: A_stack = [s_1 p_1 A_1; …; s_K p_K A_K] (Σr_k × d_in), B_stack = [B_1 … B_K]
(d_out × Σr_k), same client order, so B_stack A_stack = Σ p_k s_k B_k A_k exactly. The stack
is merged into every client's frozen base, and each round starts fresh adapters on it.

The server keeps the per-round stacks: a client that skipped rounds receives every stack it
missed, in order, before it trains (partial participation), and that counts in its downlink.
"""

from __future__ import annotations

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Setup
from fedlora.methods.errors import MethodError
from fedlora.ops.lowrank import LowRank, stack


class FLoRA:
    name = "flora"
    summary = "Stack the clients' factors so the merge equals Σ p_k s_k B_k A_k exactly; fresh adapters each round."

    def __init__(self, setup: Setup) -> None:
        weights = setup.options.get("weights", "data")
        if weights not in ("data", "uniform"):
            raise MethodError(f"method.weights: unknown value {weights!r} for flora (accepted: data, uniform)")
        self.setup = setup
        self.uniform = weights == "uniform"
        self.history: list[Delta] = []  # one merged stack per aggregated round
        self.synced: dict[int, int] = {}  # client → how many stacks its base holds

    def plan(self, client: int, round: int) -> ClientPlan:
        have = self.synced.get(client, 0)
        return ClientPlan(
            client=client,
            round=round,
            rank=self.setup.ranks[client],
            scale=self.setup.scales[client],
            base_updates=self.history[have:],
            base_version=len(self.history),
        )

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> None:
        if self.uniform:
            weights = [1.0 / len(updates)] * len(updates)
        merged: Delta = {}
        for name in self.setup.layers:
            terms = [
                LowRank(u.factors[name].B, u.factors[name].A * (u.scale * p))  # (d_out×r_k), (r_k×d_in)
                for u, p in zip(updates, weights)
            ]
            merged[name] = [stack(terms)]  # (d_out × Σr_k) @ (Σr_k × d_in)
        self.history.append(merged)
        for u in updates:  # they held every earlier stack when they trained
            self.synced[u.client] = len(self.history) - 1

    def global_delta(self) -> Delta:
        return {name: [t for merged in self.history for t in merged[name]] for name in self.setup.layers}
