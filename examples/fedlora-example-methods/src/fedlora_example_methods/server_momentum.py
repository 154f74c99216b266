"""Server momentum on FedIT's factors (FedAvgM, Hsu et al. 2019, applied to B and A): one rank for every client.

The server averages B and A as FedIT does, then takes a momentum step towards the means:

    v_t = β v_{t−1} + (X̄_t − X_{t−1}),    X_t = X_{t−1} + v_t        for X in {B, A},

computed as X_t = X̄_t + β v_{t−1}, v_t = X_t − X_{t−1} (the same step), so that β = 0 is FedIT bit for bit. The velocity is server state: it is checkpointed with the factors (``state_keys``).
"""

from __future__ import annotations

import torch

from fedlora.methods import Factors, Setup
from fedlora.methods.fedit import FedIT
from fedlora.methods.options import Option, read_options


class ServerMomentum(FedIT):
    name = "server-momentum"
    summary = "FedIT with server momentum on B and A (FedAvgM); one shared rank for all clients."

    options = {"beta": Option(0.9, "the server's momentum β (0: FedIT)", low=0.0, high=0.999)}
    state_keys = ("factors", "velocity")
    # FedIT's declarations hold (one rank, one scale, sums only, not exact), and its reference formula: after one
    # round from the start the velocity is X̄ − X_0, so X_1 = X̄. Its plan and global model are FedIT's too.

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.beta = read_options(self.name, self.options, setup.options)["beta"]
        self.velocity = {n: Factors(torch.zeros_like(f.B), torch.zeros_like(f.A)) for n, f in self.factors.items()}

    def from_means(self, means: dict[str, torch.Tensor], round: int) -> None:
        """X ← X̄ + β v and v ← X_new − X_old, for B and A of every layer."""
        for name, f in self.factors.items():
            v = self.velocity[name]
            B, A = means[name + ".B"] + self.beta * v.B, means[name + ".A"] + self.beta * v.A
            self.velocity[name] = Factors(B - f.B, A - f.A)
            self.factors[name] = Factors(B, A)
