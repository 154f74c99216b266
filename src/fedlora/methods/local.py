"""Local-only reference (lower bound): every client trains its own LoRA at r_k, alone.

No aggregation and no communication. There is no global model: each client is evaluated
with its own adapter, and the "global" test loss is the mean of the clients' own models on
the global test split.
"""

from __future__ import annotations

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Method, Setup, plan_for_layers
from fedlora.methods.reference import none
from fedlora.methods.registry import register
from fedlora.methods.options import read_options
from fedlora.ops.lowrank import LowRank, kaiming_A, seeded_generator


@register
class LocalOnly(Method):
    name = "local"
    summary = "Reference: each client trains its own rank-r_k LoRA on its own data; no communication."
    options: dict = {}
    state_keys = ("factors",)
    exact = False  # no global model to be exact about (agg_noise undefined)
    sums_only = False  # each client's own upload is its model
    personal = True  # evaluated per client with client_delta(k)
    communicates = False
    reference = none

    def __init__(self, setup: Setup) -> None:
        read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.factors: dict[int, dict[str, Factors]] = {}

    def _initial(self, client: int) -> dict[str, Factors]:
        gen = seeded_generator(self.setup.seed, 0, client)
        ranks = self.setup.layer_ranks(client)
        return {
            n: Factors(B=torch.zeros(d_out, ranks[n], dtype=self.setup.dtype), A=kaiming_A(ranks[n], d_in, gen, self.setup.dtype))
            for n, (d_out, d_in) in self.setup.layers.items()
        }

    def plan(self, client: int, round: int) -> ClientPlan:
        own = self.factors.get(client) or self._initial(client)
        rank, pattern = plan_for_layers(self.setup, client)
        init = {n: Factors(f.B.clone(), f.A.clone()) for n, f in own.items()}
        return ClientPlan(client=client, round=round, rank=rank, rank_pattern=pattern, scale=self.setup.scales[client], init=init)

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> list[float]:
        """Keep each client's upload as its own model; the server owns an upload once it arrives (no copy)."""
        for u in updates:
            self.factors[u.client] = dict(u.factors)
        return []  # nothing is averaged

    def client_delta(self, client: int) -> Delta:
        """Client k's own model: W_0 + s_k B_k A_k."""
        s = self.setup.scales[client]
        return {n: [LowRank(f.B * s, f.A)] for n, f in self.factors.get(client, {}).items()}

    def global_delta(self) -> Delta:
        """No global model exists; W_0 stands in (used only for export, which refuses it)."""
        return {}
