"""A personal model per client from a mix of its own factors and the global ones: keeps state on the client.

The server averages B and A as FedIT does. Client k keeps the factors it trained last (never sent
anywhere but in its uploads) and starts its next round from

    B_k ← α B_k^own + (1 − α) B̄,    A_k ← α A_k^own + (1 − α) Ā,

its own model being the factors it starts from. α = 0 is FedIT; a client's first round starts
from the global factors.
"""

from __future__ import annotations

import dataclasses

import torch

from fedlora.methods import ClientPlan, ClientUpdate, Delta, Factors, Setup
from fedlora.methods.base import Kept
from fedlora.methods.fedit import FedIT
from fedlora.methods.options import Option, read_options
from fedlora.methods.reference import none


class MixedPersonal(FedIT):
    name = "mixed-personal"
    summary = "FedIT's global factors mixed with each client's own (kept on the client): one personal model per client."

    options = {"alpha": Option(0.5, "the share α of the client's own factors in its start (0: FedIT)", low=0.0, high=1.0)}
    personal = True  # each client is evaluated with its own mix
    keeps = True  # the client's own factors stay on the client
    reference = none  # a personal model per client, checked on the clients
    # the rest is FedIT's: one rank and one scale, sums only (Σ w_k B_k, Σ w_k A_k), the plan of the shared factors

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.alpha = read_options(self.name, self.options, setup.options)["alpha"]

    def client_start(self, plan: ClientPlan, kept: Kept | None) -> ClientPlan:
        """Client side: α of what the client kept, 1 − α of the global factors (the global ones before its first round)."""
        if kept is None or plan.init is None:
            return plan
        a = self.alpha
        init = {}
        for name, g in plan.init.items():
            B, A = kept[name + ".B"].to(g.B.dtype), kept[name + ".A"].to(g.A.dtype)
            init[name] = Factors(B * a + g.B * (1 - a), A * a + g.A * (1 - a))
        return dataclasses.replace(plan, init=init)

    def client_keep(self, plan: ClientPlan, update: ClientUpdate) -> Kept:
        """Client side: the factors as trained."""
        out: dict[str, torch.Tensor] = {}
        for name, f in update.factors.items():
            out[name + ".B"], out[name + ".A"] = f.B.detach().clone(), f.A.detach().clone()
        return out

    def global_delta(self) -> Delta:
        """No global model: each client's model is its own mix, which only the client holds (export refuses it)."""
        return {}

    def client_delta(self, client: int) -> Delta:
        raise RuntimeError("mixed-personal: a client's model mixes in its own factors, which only the client has (client_evaluate)")
