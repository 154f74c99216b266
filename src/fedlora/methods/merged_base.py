"""The server's record of deltas merged into the frozen base (FLoRA, zero-padding), bounded in rounds.

After t merges the base is W_t = W_0 + T_t. The server holds, per layer (methods.md §4):
- ``total``: T_t in bounded form (``ops.lowrank.add_term``): the merges side by side while they
  hold fewer numbers than the matrix, one dense matrix from then on — never a list that grows;
- ``recent``: the newest merges, kept only while together they are cheaper than sending T_t;
- ``synced``: each client's base version (one integer per client).

A client at version v is sent, per layer, either the merges v+1..t (when all are still kept and
they are the cheaper message) or T_t itself, a reset: both exact, both counted on the wire.
Every holder of a base adds the same terms in the same order (``add_term``, ``accumulate``), so
a client's base and the server's T_t agree bit for bit on one device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from fedlora.methods.base import BaseUpdate, ClientPlan, Delta, LayerShapes, Setup, plan_for_layers
from fedlora.ops.lowrank import Term, add_term


def terms_size(terms: Iterable[Term]) -> int:
    return sum(t.size for t in terms)


@dataclass
class BaseDelta:
    """W_v − W_0 per layer at version v, in bounded form: what a client's frozen base holds."""

    version: int = 0
    layers: dict[str, list[Term]] = field(default_factory=dict)

    def add(self, merge: dict[str, Term]) -> None:
        """One more merge on every layer (version v → v + 1)."""
        for name, term in merge.items():
            self.layers[name] = add_term(self.layers.get(name, []), term)
        self.version += 1

    def catch_up(self, plan: ClientPlan) -> None:
        """Apply a plan's base update: per layer the merges since this version, or the whole delta."""
        update = plan.base
        if update is None or update.version == self.version:
            return
        if update.since != self.version:
            raise RuntimeError(f"client {plan.client}: base at version {self.version}, the plan's update brings {update.since} to {update.version}")
        for name, terms in update.reset.items():
            self.layers[name] = list(terms)
        for name, merges in update.merges.items():
            for term in merges:
                self.layers[name] = add_term(self.layers.get(name, []), term)
        self.version = update.version

    def delta(self) -> Delta:
        return {name: list(terms) for name, terms in self.layers.items()}


class MergedBase:
    """T_t, the recent merges and every client's version: the whole state of a merging method's base."""

    def __init__(self, layers: LayerShapes, dtype: torch.dtype) -> None:
        self.shapes = dict(layers)
        self.dtype = dtype
        self.total = BaseDelta(0, {name: [] for name in layers})
        self.recent: dict[str, list[tuple[int, Term]]] = {name: [] for name in layers}  # (version it made, merge)
        self.synced: dict[int, int] = {}  # client → the version its base holds

    @property
    def version(self) -> int:
        return self.total.version

    def merge(self, merge: dict[str, Term], trained: Iterable[int]) -> None:
        """Add a round's merge; the clients that trained held version t − 1 (their plan brought them there)."""
        merge = {name: term.to(self.dtype) for name, term in merge.items()}  # the state keeps its dtype
        self.total.add(merge)
        for name, term in merge.items():
            kept = [*self.recent[name], (self.version, term)]
            reset, size = terms_size(self.total.layers[name]), terms_size(t for _, t in kept)
            while kept and size > reset:  # a reset would be the cheaper message
                size -= kept.pop(0)[1].size
            self.recent[name] = kept
        for client in trained:
            self.synced[client] = self.version - 1

    def update_for(self, client: int) -> BaseUpdate:
        """What brings client k's base from its version to the current one, in the cheapest exact form per layer."""
        return self.update_since(self.synced.get(client, 0))

    def update_since(self, since: int) -> BaseUpdate:
        """What brings a base at version ``since`` to the current one (per layer: the missed merges or a reset).

        Empty when it is there already: the client can still check that its base is at that version.
        """
        now = self.version
        if since == now:
            return BaseUpdate(since=now, version=now)
        merges: Delta = {}
        reset: Delta = {}
        for name, kept in self.recent.items():
            missed = [t for v, t in kept if v > since]
            complete = bool(kept) and kept[0][0] <= since + 1
            if since > 0 and complete and terms_size(missed) < terms_size(self.total.layers[name]):
                merges[name] = missed
            else:
                reset[name] = list(self.total.layers[name])
        return BaseUpdate(since=since, version=now, merges=merges, reset=reset)

    def delta(self) -> Delta:
        """G_t − W_0 per layer: T_t's terms (at most the matrix's size)."""
        return self.total.delta()

    def fresh_plan(self, setup: Setup, client: int, round: int) -> ClientPlan:
        """A fresh adapter at the client's rank on its base, brought up to date first."""
        rank, pattern = plan_for_layers(setup, client)
        return ClientPlan(
            client=client, round=round, rank=rank, rank_pattern=pattern, scale=setup.scales[client], base=self.update_for(client),
        )

    def nbytes(self) -> int:
        """Bytes the server holds for the base (T_t and the recent merges, each tensor once)."""
        seen: dict[int, int] = {}
        for terms in self.total.layers.values():
            for t in terms:
                for x in t.tensors():
                    seen[id(x)] = x.numel() * x.element_size()
        for kept in self.recent.values():
            for _, t in kept:
                for x in t.tensors():
                    seen[id(x)] = x.numel() * x.element_size()
        return sum(seen.values())

