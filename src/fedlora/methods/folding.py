"""Aggregation folded in one update at a time, for methods whose aggregate is a weighted sum.

FLoRA, zero-padding, FedIT, FFA-LoRA and ``full`` aggregate Σ_k w_k X_k / Σ_k w_k. Folding each
update into a running sum as it arrives keeps the server's memory at one sum however many
clients a round samples (benchmark 4: the uploads of 1000 clients would otherwise all be held
until the round ends). ``aggregate(updates, weights)`` is the same fold over a list, so the
batch and the streaming server run one code.

A folding method defines ``begin(round) -> Sum``, ``fold(acc, update, weight)`` (the weight
unnormalised: an example count, or what the method's own weighting makes of it) and
``commit(acc)``, which divides by the total and replaces the method's state. Nothing touches
the method's state before ``commit``, so a round that fails keeps the previous global model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedlora.methods.base import ClientUpdate, Method


@dataclass
class Sum:
    """One round's running sum: per-layer partial results, the total weight, who contributed."""

    round: int
    layers: dict[str, Any] = field(default_factory=dict)
    total: float = 0.0
    clients: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def add(self, client: int, weight: float) -> None:
        self.total += weight
        self.clients.append(client)
        self.weights.append(weight)

    def applied(self) -> dict[int, float]:
        """Each client's normalised weight w_k / Σ w as the method applied it (metrics' ``weights``)."""
        return {k: w / self.total for k, w in zip(self.clients, self.weights)} if self.total > 0 else {}

    def norm(self) -> float:
        """1 / Σ w_k."""
        assert self.total > 0, "a round's weights sum to zero"
        return 1.0 / self.total


class Folds(Method):
    """A method that aggregates as begin → fold every update → commit."""

    folds = True

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> list[float]:
        acc = self.begin(round)  # type: ignore[attr-defined]
        for u, w in zip(updates, weights):
            self.fold(acc, u, w)  # type: ignore[attr-defined]
        self.commit(acc)  # type: ignore[attr-defined]
        applied = acc.applied()
        return [applied.get(u.client, 0.0) for u in updates]


def add_weighted(sums: dict[str, torch.Tensor], key: str, t: torch.Tensor, weight: float, dtype: torch.dtype | None = None) -> None:
    """sums[key] += w·t in place; the first term is a new tensor (in ``dtype``, default t's).

    ``t`` is cast to the sum's dtype before it is weighted, whatever the device's rules for mixed
    dtypes: a bfloat16 upload is never scaled in bfloat16 (a no-op when the dtypes agree).
    """
    if key in sums:
        sums[key].add_(t.to(sums[key].dtype), alpha=float(weight))
    else:
        sums[key] = t.to(dtype or t.dtype) * float(weight)

