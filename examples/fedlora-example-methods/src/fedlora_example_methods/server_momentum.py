"""Server momentum on FedIT's factors (FedAvgM, Hsu et al. 2019, applied to B and A): one rank for every client.

The server averages B and A as FedIT does, then takes a momentum step towards the means:

    v_t = β v_{t−1} + (X̄_t − X_{t−1}),    X_t = X_{t−1} + v_t        for X in {B, A},

computed as X_t = X̄_t + β v_{t−1}, v_t = X_t − X_{t−1} (the same step), so that β = 0 is FedIT bit for bit. The velocity is server state: it is checkpointed with the factors (``state_keys``).
"""

from __future__ import annotations

import torch

from fedlora.methods import ClientPlan, Delta, Factors, Setup
from fedlora.methods.base import fresh_factors
from fedlora.methods.checks import one_rank, one_scale
from fedlora.methods.options import Option, read_options
from fedlora.methods.reference import means
from fedlora.methods.sums import SumsBA
from fedlora.ops.lowrank import LowRank


class ServerMomentum(SumsBA):
    name = "server-momentum"
    summary = "FedIT with server momentum on B and A (FedAvgM); one shared rank for all clients."

    options = {"beta": Option(0.9, "the server's momentum β (0: FedIT)", low=0.0, high=0.999)}
    state_keys = ("factors", "velocity")
    ranks = "one"
    scales = "one"
    exact = False  # the product of means, as FedIT
    sums_only = True  # Σ w_k B_k and Σ w_k A_k
    reference = means  # one round from the start: the velocity is X̄ − X_0, so X_1 = X̄

    def __init__(self, setup: Setup) -> None:
        self.beta = read_options(self.name, self.options, setup.options)["beta"]
        self.setup = setup
        self.rank, self.scale = one_rank(self.name, setup), one_scale(self.name, setup)
        self.factors: dict[str, Factors] = fresh_factors(setup.layers, self.rank, setup.seed, setup.dtype)
        self.velocity = {n: Factors(torch.zeros_like(f.B), torch.zeros_like(f.A)) for n, f in self.factors.items()}

    def plan(self, client: int, round: int) -> ClientPlan:
        init = {n: Factors(f.B.clone(), f.A.clone()) for n, f in self.factors.items()}
        return ClientPlan(client=client, round=round, rank=self.rank, scale=self.scale, init=init)

    def from_means(self, means: dict[str, torch.Tensor], round: int) -> None:
        """X ← X̄ + β v and v ← X_new − X_old, for B and A of every layer."""
        for name, f in self.factors.items():
            v = self.velocity[name]
            B, A = means[name + ".B"] + self.beta * v.B, means[name + ".A"] + self.beta * v.A
            self.velocity[name] = Factors(B - f.B, A - f.A)
            self.factors[name] = Factors(B, A)

    def global_delta(self) -> Delta:
        return {n: [LowRank(f.B * self.scale, f.A)] for n, f in self.factors.items()}
