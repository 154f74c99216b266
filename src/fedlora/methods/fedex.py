"""FedEx-LoRA: FedIT plus the exact residual (Singhal et al., "Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models", ACL 2025).

FedIT's averages (B̄, Ā) are the next round's adapter; what averaging the factors loses,

    E = s Σ_k p_k B_k A_k − s B̄ Ā = s Σ_k p_k (B_k − B̄)(A_k − Ā),

is added to every client's frozen base. The global model W_0 + Σ_t E_t + s B̄ Ā is then the
FedAvg ideal exactly (agg_noise 0), and every client resumes from it (init_noise 0).

E travels as its own thin SVD with canonical signs (``sum_only_form``), which reveals E and nothing of
any one client (the centred pairs themselves, with B̄ and Ā, would give back every client's B_k and A_k),
at its rank or dense where that is smaller. Its rank is at most (K − 1)·r: the K centred pairs are linearly dependent:
Σ_k p_k (B_k − B̄) = 0, so for any reference client j

    Σ_k p_k (B_k − B̄)(A_k − Ā) = Σ_k p_k (B_k − B̄) A_k − 0 · Ā = Σ_{k≠j} p_k (B_k − B̄)(A_k − A_j),

the term of k = j being zero. E is computed from those K − 1 pairs (B_k − B̄)(s p_k (A_k − A_j))
(j: the client of the largest weight); a pair whose difference is exactly zero is left out, and
nothing is merged when every pair is (equal clients, or equal A_k: then the sum is exactly zero).
The identity is exact; in floating point E equals s Σ_k p_k B_k A_k − s B̄Ā to round-off.

The bases are held by a ``MergedBase`` (methods.md §4), so a client that skipped rounds catches
up exactly; a round without a residual on a layer merges nothing there. The paper's code averages
uniformly; ``weights: data`` (p_k by example counts) is the default, as for FedIT here.
"""

from __future__ import annotations

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Method, Setup, fresh_factors
from fedlora.methods.reference import ideal
from fedlora.methods.registry import register
from fedlora.methods.checks import start_one_rank
from fedlora.methods.merged_base import MergedBase
from fedlora.ops.weights import Weighting
from fedlora.methods.options import WEIGHTING
from fedlora.ops.lowrank import LowRank, Term, stack, sum_only_form


@register
class FedEx(Method):
    name = "fedex"
    summary = "FedIT's averages plus the exact residual s Σ p_k B_k A_k − s B̄Ā merged into every base (exact)."

    options = dict(WEIGHTING)
    state_keys = ("factors", "merged.total.version", "merged.total.layers", "merged.recent", "merged.synced")
    rank: int  # set by start_one_rank, with scale and weighting
    scale: float
    weighting: Weighting
    ranks = "one"
    scales = "one"
    exact = True  # the residual makes the global model the FedAvg ideal
    merges = True
    sums_only = False  # the residual Σ p_k (B_k − B̄)(A_k − Ā) needs each client's own pair
    reference = ideal

    def __init__(self, setup: Setup) -> None:
        start_one_rank(self, setup)
        self.factors: dict[str, Factors] = fresh_factors(setup.layers, self.rank, setup.seed, setup.dtype)
        self.merged = MergedBase(setup.layers, setup.dtype)

    def plan(self, client: int, round: int) -> ClientPlan:
        """(B̄, Ā) on the base brought up to date (the residuals it missed)."""
        init = {n: Factors(f.B.clone(), f.A.clone()) for n, f in self.factors.items()}
        return ClientPlan(client=client, round=round, rank=self.rank, scale=self.scale, init=init, base=self.merged.update_for(client))

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> list[float]:
        """B̄, Ā, and E = Σ_{k≠j} (B_k − B̄)(s p_k (A_k − A_j)) merged into the base (rank ≤ (K−1)·r; none when it is 0)."""
        p = self.weighting.applied(weights)
        dtype = self.setup.dtype
        new, residual = {}, {}
        for name in self.setup.layers:
            Bs = [u.factors[name].B.to(dtype) for u in updates]
            As = [u.factors[name].A.to(dtype) for u in updates]
            B_bar = sum((pk * B for pk, B in zip(p, Bs)), torch.zeros_like(Bs[0]))  # 0 + x is x: the same sums as sum()'s
            A_bar = sum((pk * A for pk, A in zip(p, As)), torch.zeros_like(As[0]))
            new[name] = Factors(B=B_bar, A=A_bar)
            if (term := residual_term(p, Bs, As, B_bar, self.scale)) is not None:
                residual[name] = term
        self.factors = new
        self.merged.merge(residual, [u.client for u in updates])  # a layer without a residual gets no merge this round
        return list(p)

    def global_delta(self) -> Delta:
        """Σ_t E_t + s B̄ Ā."""
        return {n: [*self.merged.delta()[n], LowRank(f.B * self.scale, f.A)] for n, f in self.factors.items()}

    def adapter_delta(self) -> Delta:
        """s B̄ Ā over the base, which already holds the residuals."""
        return {n: [LowRank(f.B * self.scale, f.A)] for n, f in self.factors.items()}


def residual_term(p: list[float], Bs: list[torch.Tensor], As: list[torch.Tensor], B_bar: torch.Tensor, scale: float) -> Term | None:
    """s Σ_k p_k B_k A_k − s B̄ Ā as Σ_{k≠j} (B_k − B̄)(s p_k (A_k − A_j)) in its smaller form, or None when it is exactly 0.

    B_k: (d_out × r), A_k: (r × d_in), B̄ = Σ p_k B_k. Clients of weight 0 are not in B̄ and drop out;
    j is the client of the largest weight (its own term is 0); a pair with an exactly zero difference
    adds nothing and is left out. Rank at most (K − 1)·r for K clients of positive weight.
    """
    kept = [k for k, pk in enumerate(p) if pk > 0]
    if not kept:
        return None
    j = max(kept, key=lambda k: p[k])  # the first of the largest weights
    terms, coefs = [], []
    for k in kept:
        if k == j:
            continue
        dB, dA = Bs[k] - B_bar, As[k] - As[j]  # (d_out × r), (r × d_in)
        if torch.count_nonzero(dB) == 0 or torch.count_nonzero(dA) == 0:
            continue
        terms.append(LowRank(dB, dA))
        coefs.append(scale * p[k])
    return sum_only_form(stack(terms, coefs)) if terms else None  # the residual alone goes down, not the clients' pairs
