"""A dense task head (a classifier) trained by every client and FedAvg'd beside any method.

It wraps the method rather than threading through it: the method never sees the head. A
personal method (``local``) keeps one head per client instead of averaging.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlora.ops.lowrank import weighted_mean

GLOBAL = -1


class Heads:
    def __init__(self, initial: dict[str, torch.Tensor], clients: list[int], personal: bool) -> None:
        self.personal = personal
        self.heads: dict[int, dict[str, torch.Tensor]] = {c: initial for c in clients} if personal else {GLOBAL: initial}

    def of(self, client: int) -> dict[str, torch.Tensor]:
        """The head client k starts from (the global one unless the method is personal)."""
        return self.heads[client if self.personal else GLOBAL]

    def aggregate(self, clients: list[int], heads: list[dict[str, torch.Tensor]], weights: list[float]) -> None:
        if not heads or not heads[0]:
            return
        if self.personal:
            self.heads.update(zip(clients, heads))
        else:
            self.heads[GLOBAL] = {n: weighted_mean([h[n] for h in heads], weights) for n in heads[0]}

    def state(self) -> dict[int, Any]:
        return self.heads

    def load(self, state: dict[int, Any]) -> None:
        self.heads = state
