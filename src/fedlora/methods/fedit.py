"""FedIT: FedAvg on the LoRA factors (Zhang et al., 2024), the homogeneous-rank baseline.

B̄ = Σ p_k B_k, Ā = Σ p_k A_k; the global update is s·B̄Ā. Not exact: the product of means
differs from the mean of products by Σ p_k (B_k − B̄)(A_k − Ā) (methods.md §1). Needs one
rank and one scale for every client.
"""

from __future__ import annotations

from fedlora.methods.base import ClientPlan, Delta, Factors, Setup, fresh_factors
from fedlora.methods.reference import means
from fedlora.methods.registry import register
from fedlora.ops.lowrank import LowRank
from fedlora.methods.checks import one_rank, one_scale
from fedlora.methods.sums import SumsBA
from fedlora.methods.options import read_options


@register
class FedIT(SumsBA):
    name = "fedit"
    summary = "FedAvg of A and B separately; one shared rank for all clients (inexact product)."

    options: dict = {}
    state_keys = ("factors",)
    ranks = "one"
    scales = "one"
    exact = False  # the product of means is not the mean of products
    sums_only = True  # Σ w_k B_k and Σ w_k A_k
    reference = means

    def __init__(self, setup: Setup) -> None:
        read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.rank, self.scale = one_rank(self.name, setup), one_scale(self.name, setup)
        self.factors: dict[str, Factors] = fresh_factors(setup.layers, self.rank, setup.seed, setup.dtype)

    def plan(self, client: int, round: int) -> ClientPlan:
        init = {n: Factors(f.B.clone(), f.A.clone()) for n, f in self.factors.items()}
        return ClientPlan(client=client, round=round, rank=self.rank, scale=self.scale, init=init)

    def global_delta(self) -> Delta:
        return {n: [LowRank(f.B * self.scale, f.A)] for n, f in self.factors.items()}
