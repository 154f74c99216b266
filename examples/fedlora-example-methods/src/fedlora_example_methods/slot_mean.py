"""Per-slot means of zero-padded factors: any rank for every client, sums only.

The global LoRA of a layer has R slots, R the largest rank of any client there. Client k trains
the first r_k slots, starting from the global ones. Slot j of B and of A becomes the weighted mean
over the round's clients that trained it; a slot that none trained keeps its value:

    B̄[:, j] = Σ_{k: r_k > j} w_k B_k[:, j] / Σ_{k: r_k > j} w_k        (A̅[j] likewise).

Each client contributes its factors zero-padded to R and a 0/1 indicator of its slots, so the
server needs only weighted sums: the indicator's sum is each slot's weight. Like FedIT it is
not exact (the product of means is not the mean of products).
"""

from __future__ import annotations

import torch

from fedlora.methods import ClientPlan, ClientUpdate, Delta, Factors, Setup
from fedlora.methods.base import plan_for_layers
from fedlora.methods.checks import one_scale
from fedlora.methods.options import read_options
from fedlora.methods.reference import slot_means
from fedlora.methods.sums import Sums
from fedlora.ops.lowrank import LowRank, kaiming_A, pad, seeded_generator


class SlotMean(Sums):
    name = "slot-mean"
    summary = "Zero-pad every client's factors; average each rank slot over the clients that trained it."

    state_keys = ("factors",)
    ranks = "any"
    scales = "one"
    exact = False
    sums_only = True  # Σ w_k pad(B_k), Σ w_k pad(A_k) and Σ w_k 1[j < r_k]
    reference = slot_means

    def __init__(self, setup: Setup) -> None:
        read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.scale = one_scale(self.name, setup)
        gen = seeded_generator(setup.seed, 0)  # PEFT's start: B = 0, A Kaiming-uniform, the same on every process
        self.factors: dict[str, Factors] = {}
        for name, (d_out, d_in) in setup.layers.items():
            R = max(setup.rank_of(k, name) for k in setup.ranks)
            self.factors[name] = Factors(torch.zeros(d_out, R, dtype=setup.dtype), kaiming_A(R, d_in, gen, setup.dtype))

    def plan(self, client: int, round: int) -> ClientPlan:
        """The first r_k slots of every layer's global factors."""
        rank, pattern = plan_for_layers(self.setup, client)
        init = {}
        for name, f in self.factors.items():
            r = pattern.get(name, rank)
            init[name] = Factors(f.B[:, :r].clone(), f.A[:r].clone())
        return ClientPlan(client=client, round=round, rank=rank, rank_pattern=pattern, scale=self.scale, init=init)

    def contribution(self, update: ClientUpdate, round: int) -> dict[str, torch.Tensor]:
        """pad(B_k), pad(A_k) and the indicator of the slots client k trained, per layer."""
        out = {}
        for name, g in self.factors.items():
            f, R = update.factors[name], g.A.shape[0]
            out[name + ".B"], out[name + ".A"] = pad(f.B, f.A, R)
            out[name + ".slots"] = (torch.arange(R) < f.A.shape[0]).to(g.A.dtype)
        return out

    def from_means(self, means: dict[str, torch.Tensor], round: int) -> None:
        """Each trained slot: the padded means divided by the slot's share of the weight."""
        for name, g in self.factors.items():
            share = means[name + ".slots"]
            trained = share > 0
            B, A = g.B.clone(), g.A.clone()
            B[:, trained] = means[name + ".B"][:, trained] / share[trained]
            A[trained] = means[name + ".A"][trained] / share[trained].unsqueeze(1)
            self.factors[name] = Factors(B, A)

    def global_delta(self) -> Delta:
        return {n: [LowRank(f.B * self.scale, f.A)] for n, f in self.factors.items()}
