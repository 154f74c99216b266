"""Centralized reference (upper bound): one client holds every client's training data.

One persistent LoRA at rank R = max r_k trains on the pooled data for as many steps per round
as a client would; nothing is communicated. The global model is W_0 + s·BA.
"""

from __future__ import annotations

from fedlora.methods.base import ClientPlan, Delta, Factors, Setup, fresh_factors
from fedlora.methods.reference import first_client
from fedlora.methods.registry import register
from fedlora.methods.errors import MethodError
from fedlora.methods.options import read_options
from fedlora.ops.weights import Weighting
from fedlora.methods.sums import SumsBA
from fedlora.ops.lowrank import LowRank


@register
class Centralized(SumsBA):
    name = "centralized"
    summary = "Reference: one model trained on all clients' data pooled (rank max r_k); no communication."
    options: dict = {}
    state_keys = ("factors",)
    scales = "one"
    exact = True  # one pooled model: its upload is the ideal
    sums_only = True  # a sum of one upload, weight 1 (nothing is communicated)
    pooled = True  # the simulator trains client 0 on every client's training split
    communicates = False
    reference = first_client
    weighting = Weighting("uniform")  # one upload, weight 1

    def __init__(self, setup: Setup) -> None:
        read_options(self.name, self.options, setup.options)
        if len(set(setup.scales.values())) != 1:
            raise MethodError(f"lora.scale: centralized needs one scale, got {sorted(set(setup.scales.values()))}")
        self.setup = setup
        self.rank = max(setup.ranks.values())
        self.scale = next(iter(setup.scales.values()))
        self.factors = fresh_factors(setup.layers, self.rank, setup.seed, setup.dtype)

    def plan(self, client: int, round: int) -> ClientPlan:
        init = {n: Factors(f.B.clone(), f.A.clone()) for n, f in self.factors.items()}
        return ClientPlan(client=client, round=round, rank=self.rank, scale=self.scale, init=init)

    def global_delta(self) -> Delta:
        return {n: [LowRank(f.B * self.scale, f.A)] for n, f in self.factors.items()}
