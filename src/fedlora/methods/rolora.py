"""RoLoRA: alternating optimisation of the LoRA factors ("Robust Federated Finetuning
of LLMs via Alternating Optimization of LoRA", NeurIPS 2025, arXiv 2502.01755).

One shared pair (B, A) at one rank r, resumed by every client (no re-initialisation). Odd rounds
train only B with A frozen at the global A; even rounds train only A with B frozen at the
global B. B starts at 0 (PEFT's init), so B goes first: an A round from B = 0 would get no
gradient. The server averages the one factor that trained, with the other one shared by every
client, so the average is exact:

    Σ_k p_k s B_k A = s B̄ A,    Σ_k p_k s B A_k = s B Ā     (agg_noise 0).

Each direction sends one factor: up r·d_out (B rounds) or r·d_in (A rounds); down both factors.
"""

from __future__ import annotations

import torch


from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Setup, fresh_factors
from fedlora.methods.reference import ideal
from fedlora.methods.registry import register
from fedlora.methods.checks import start_one_rank
from fedlora.methods.sums import Sums
from fedlora.ops.weights import Weighting
from fedlora.methods.options import WEIGHTING
from fedlora.ops.lowrank import LowRank


def trains_B(round: int) -> bool:
    """Odd rounds (1, 3, …) train B, even rounds train A."""
    return round % 2 == 1


@register
class RoLoRA(Sums):
    name = "rolora"
    summary = "Alternate: odd rounds train and average B (A shared), even rounds A (B shared); exact averages."

    options = dict(WEIGHTING)
    state_keys = ("factors",)
    rank: int  # set by start_one_rank, with scale and weighting
    scale: float
    weighting: Weighting
    ranks = "one"
    scales = "one"
    exact = True  # the factor that did not train is shared: the average of the trained one is exact
    sums_only = True  # Σ w_k B_k (B rounds) or Σ w_k A_k (A rounds)
    reference = ideal

    def __init__(self, setup: Setup) -> None:
        start_one_rank(self, setup)
        self.factors: dict[str, Factors] = fresh_factors(setup.layers, self.rank, setup.seed, setup.dtype)

    def plan(self, client: int, round: int) -> ClientPlan:
        b_round = trains_B(round)
        init = {n: Factors(f.B.clone(), f.A.clone()) for n, f in self.factors.items()}
        return ClientPlan(client=client, round=round, rank=self.rank, scale=self.scale, init=init, train_A=not b_round, train_B=b_round)

    def contribution(self, u: ClientUpdate, round: int) -> dict[str, torch.Tensor]:
        """The factor that trained this round, per layer."""
        which = "B" if trains_B(round) else "A"
        return {name: getattr(u.factors[name], which) for name in self.setup.layers}

    def from_means(self, means: dict[str, torch.Tensor], round: int) -> None:
        """Replace the trained factor by its weighted mean; the frozen one stays as it was."""
        b_round = trains_B(round)
        self.factors = {
            name: Factors(B=means[name], A=f.A) if b_round else Factors(B=f.B, A=means[name])
            for name, f in self.factors.items()
        }

    def global_delta(self) -> Delta:
        return {n: [LowRank(f.B * self.scale, f.A)] for n, f in self.factors.items()}
