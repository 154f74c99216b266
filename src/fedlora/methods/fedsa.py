"""FedSA-LoRA: share A, keep B on the client (Guo et al., "Selective Aggregation for Low-Rank
Adaptation in Federated Learning", ICLR 2025).

Every client keeps a persistent LoRA (A_k, B_k) and trains both; only A is shared. The server
sets Ā = Σ_k p_k A_k (``weights: data``, the paper's FedAvg by data size, or ``uniform``), and each
client starts its next round from (B_k, Ā): its own B_k, kept *on the client* (``Method.keeps``;
node-local state over Flower, never sent). Round 1 starts every client from B = 0 and the one
seeded A (PEFT's default init, the same for all). Uplink and downlink: r·d_in per layer.

There is no single global model: client k's model is W_0 + s B_k Ā, evaluated by the client
itself; the global split's score is the mean over the clients' models (the ``local``
convention). The shared factor is FedAvg of A exactly; there is no ideal aggregate of the
models to measure against, so ``agg_noise`` and ``init_noise`` are left undefined (None).
"""

from __future__ import annotations

import dataclasses

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Kept, Setup
from fedlora.methods.reference import none
from fedlora.methods.registry import register
from fedlora.methods.checks import start_one_rank
from fedlora.methods.sums import Sums
from fedlora.ops.weights import Weighting
from fedlora.methods.options import WEIGHTING
from fedlora.ops.lowrank import kaiming_A, seeded_generator

A_KEY = "A_bar:"  # + layer name: the shared factor in the plan's meta (init is built on the client)


@register
class FedSA(Sums):
    name = "fedsa"
    summary = "Share A (FedAvg), keep each client's B on the client: one personal model per client."

    options = dict(WEIGHTING)
    state_keys = ("A",)
    rank: int  # set by start_one_rank, with scale and weighting
    scale: float
    weighting: Weighting
    ranks = "one"
    scales = "one"
    exact = False  # no global model to be exact about (agg_noise undefined)
    sums_only = True  # Σ w_k A_k
    personal = True  # no global model: each client is evaluated with its own B_k
    keeps = True  # B_k stays on the client
    reference = none

    def __init__(self, setup: Setup) -> None:
        start_one_rank(self, setup)
        gen = seeded_generator(setup.seed, 0)
        self.A: dict[str, torch.Tensor] = {name: kaiming_A(self.rank, d_in, gen, setup.dtype) for name, (_, d_in) in setup.layers.items()}

    def plan(self, client: int, round: int) -> ClientPlan:
        """Ā per layer, nothing else: B is the client's own."""
        meta = {A_KEY + name: A.clone() for name, A in self.A.items()}
        return ClientPlan(client=client, round=round, rank=self.rank, scale=self.scale, keep_B=True, meta=meta)

    def client_start(self, plan: ClientPlan, kept: Kept | None) -> ClientPlan:
        """Client side: the adapter starts at (B_k, Ā), B_k as the client left it (B = 0 before its first round)."""
        init = {}
        for name, (d_out, _) in self.setup.layers.items():
            A = plan.meta[A_KEY + name].clone()
            B = kept[name].clone().to(A.dtype) if kept is not None else torch.zeros(d_out, self.rank, dtype=A.dtype)
            init[name] = Factors(B=B, A=A)
        meta = {k: v for k, v in plan.meta.items() if not k.startswith(A_KEY)}
        return dataclasses.replace(plan, init=init, meta=meta)

    def client_keep(self, plan: ClientPlan, update: ClientUpdate) -> Kept:
        """Client side: B_k as trained, for the client's next round."""
        return {name: f.B.detach().clone() for name, f in update.factors.items()}

    def contribution(self, u: ClientUpdate, round: int) -> dict[str, torch.Tensor]:
        """A_k of every layer (B_k never leaves the client)."""
        return {name: u.factors[name].A for name in self.setup.layers}

    def from_means(self, means: dict[str, torch.Tensor], round: int) -> None:
        """Ā = Σ w_k A_k / Σ w_k."""
        self.A = {name: means[name] for name in self.setup.layers}

    def global_delta(self) -> Delta:
        """No global model exists (each client's B is its own); W_0 stands in, and export refuses it."""
        return {}

    def client_delta(self, client: int) -> Delta:
        raise RuntimeError("fedsa: a client's model holds its own B, which only the client has (client_evaluate)")
