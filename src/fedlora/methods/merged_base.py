"""The server's record of deltas merged into the frozen base (FLoRA, zero-padding).

Each aggregated round appends one merged delta. A client is sent every merge its base does
not hold yet, in order: partial participation works and the catch-up is counted on the wire.
Only this per-round history grows on the server.
"""

from __future__ import annotations

from typing import Iterable

from fedlora.methods.base import ClientPlan, Delta, Setup, plan_for_layers


class MergedBase:
    def __init__(self, layers: Iterable[str]) -> None:
        self.layers = list(layers)
        self.history: list[Delta] = []
        self.synced: dict[int, int] = {}  # client → how many merges its base holds

    def missing(self, client: int) -> tuple[list[Delta], int]:
        """The merges client k lacks and the version its base reaches after applying them."""
        return self.history[self.synced.get(client, 0) :], len(self.history)

    def merge(self, delta: Delta, trained: Iterable[int]) -> None:
        """Append a round's merge; the clients that trained held every earlier merge."""
        self.history.append(delta)
        for client in trained:
            self.synced[client] = len(self.history) - 1

    def delta(self) -> Delta:
        """G_t − W_0: every merge so far, per layer."""
        return {name: [t for merged in self.history for t in merged[name]] for name in self.layers}

    def fresh_plan(self, setup: Setup, client: int, round: int) -> ClientPlan:
        """A fresh adapter at the client's rank on its base, brought up to date first."""
        missing, version = self.missing(client)
        rank, pattern = plan_for_layers(setup, client)
        return ClientPlan(
            client=client, round=round, rank=rank, rank_pattern=pattern, scale=setup.scales[client],
            base_updates=missing, base_version=version,
        )
