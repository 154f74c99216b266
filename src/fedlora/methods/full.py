"""Full fine-tuning of the adapted layers with FedAvg: the communication reference (1.0).

Written as a LoRA whose A is the identity and frozen: W + B·I = W + B, so training B
(d_out × d_in, scale 1) is training W itself, with the same gradients and the same AdamW
steps, while the trainer, the wire and the diagnostics stay the ones every method uses.
FedAvg of B is exactly FedAvg of the weights: B̄ = Σ p_k B_k, global model W_0 + B̄ (zero
aggregation and initialisation noise). The wire carries B̄ down and B_k up — d_out·d_in per
layer each way, the reference the LoRA methods' traffic is compared with; the identity is
rebuilt on the client. Which layers: ``lora.target_modules`` (all linear layers of the blocks
make it full fine-tuning of the blocks).
"""

from __future__ import annotations

import dataclasses

import torch

from fedlora.methods.base import ClientPlan, Delta, Factors, Setup
from fedlora.methods.reference import ideal
from fedlora.methods.registry import register
from fedlora.methods.sums import SumsB
from fedlora.methods.options import read_options
from fedlora.ops.lowrank import LowRank

B_KEY = "W_delta:"  # + layer name: the global B̄ = W_g − W_0 (d_out × d_in)


@register
class FullFedAvg(SumsB):
    name = "full"
    summary = "Reference: FedAvg of the adapted layers' full weights (d_out·d_in per layer each way); exact."
    options: dict = {}
    state_keys = ("B",)
    exact = True  # FedAvg of the weights themselves
    sums_only = True  # Σ w_k B_k (B = W − W_0); the clients' ranks and scales are not used (A = I, scale 1)
    reference = ideal

    def __init__(self, setup: Setup) -> None:
        read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.B = {name: torch.zeros(d_out, d_in, dtype=setup.dtype) for name, (d_out, d_in) in setup.layers.items()}

    def plan(self, client: int, round: int) -> ClientPlan:
        """B̄ per layer; the adapter's rank on a layer is its d_in (A = I)."""
        ranks = {name: d_in for name, (_, d_in) in self.setup.layers.items()}
        rank = max(ranks.values())
        pattern = {name: r for name, r in ranks.items() if r != rank}
        meta = {B_KEY + name: B.clone() for name, B in self.B.items()}
        return ClientPlan(client=client, round=round, rank=rank, rank_pattern=pattern, scale=1.0, train_A=False, meta=meta)

    def client_prepare(self, plan: ClientPlan) -> ClientPlan:
        """Client side: start from (B̄, I) with the identity frozen."""
        init = {
            name: Factors(B=plan.meta[B_KEY + name].clone(), A=torch.eye(d_in, dtype=plan.meta[B_KEY + name].dtype))
            for name, (_, d_in) in self.setup.layers.items()
        }
        return dataclasses.replace(plan, init=init, meta={})

    def global_delta(self) -> Delta:
        return {name: [LowRank(B, torch.eye(B.shape[1], dtype=B.dtype))] for name, B in self.B.items()}
