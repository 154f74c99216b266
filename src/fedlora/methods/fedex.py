"""FedEx-LoRA: FedIT plus the exact residual (Singhal et al., "Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models", ACL 2025).

FedIT's averages (B̄, Ā) are the next round's adapter; what averaging the factors loses,

    E = s Σ_k p_k B_k A_k − s B̄ Ā = s Σ_k p_k (B_k − B̄)(A_k − Ā),

is added to every client's frozen base. The global model W_0 + Σ_t E_t + s B̄ Ā is then the
FedAvg ideal exactly (agg_noise 0), and every client resumes from it (init_noise 0).

E travels in its cheapest exact form: the K terms (B_k − B̄)(s p_k (A_k − Ā)) stacked at rank
K·r, or the dense matrix once that is smaller (the paper sends it dense). The bases are held
by a ``MergedBase`` (methods.md §4), so a client that skipped rounds catches up exactly. The
paper's code averages uniformly; ``weights: data`` (p_k by example counts) is the default, as
for FedIT here.
"""

from __future__ import annotations


from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Method, Setup, fresh_factors
from fedlora.methods.checks import start_one_rank
from fedlora.methods.merged_base import MergedBase
from fedlora.methods.options import WEIGHTS
from fedlora.ops.lowrank import LowRank, smallest_form, stack
from fedlora.ops.weights import normalised


class FedEx(Method):
    name = "fedex"
    summary = "FedIT's averages plus the exact residual s Σ p_k B_k A_k − s B̄Ā merged into every base (exact)."

    options = {"weights": WEIGHTS}
    state_keys = ("factors", "merged.total.version", "merged.total.layers", "merged.recent", "merged.synced")

    def __init__(self, setup: Setup) -> None:
        start_one_rank(self, setup)
        self.factors: dict[str, Factors] = fresh_factors(setup.layers, self.rank, setup.seed, setup.dtype)
        self.merged = MergedBase(setup.layers, setup.dtype)

    def plan(self, client: int, round: int) -> ClientPlan:
        """(B̄, Ā) on the base brought up to date (the residuals it missed)."""
        init = {n: Factors(f.B.clone(), f.A.clone()) for n, f in self.factors.items()}
        return ClientPlan(client=client, round=round, rank=self.rank, scale=self.scale, init=init, base=self.merged.update_for(client))

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> list[float]:
        """B̄, Ā, and E = Σ_k (B_k − B̄)(s p_k (A_k − Ā)) merged into the base."""
        p = [1.0 / len(updates)] * len(updates) if self.uniform else normalised(weights)
        dtype = self.setup.dtype
        new, residual = {}, {}
        for name in self.setup.layers:
            Bs = [u.factors[name].B.to(dtype) for u in updates]
            As = [u.factors[name].A.to(dtype) for u in updates]
            B_bar = sum(pk * B for pk, B in zip(p, Bs))
            A_bar = sum(pk * A for pk, A in zip(p, As))
            kept = [(pk, B, A) for pk, B, A in zip(p, Bs, As) if pk > 0]
            terms = [LowRank(B - B_bar, A - A_bar) for _, B, A in kept]
            new[name] = Factors(B=B_bar, A=A_bar)
            residual[name] = smallest_form(stack(terms, [self.scale * pk for pk, _, _ in kept]))  # the K centred pairs, one pass
        self.factors = new
        self.merged.merge(residual, [u.client for u in updates])
        return list(p)

    def global_delta(self) -> Delta:
        """Σ_t E_t + s B̄ Ā."""
        return {n: [*self.merged.delta()[n], LowRank(f.B * self.scale, f.A)] for n, f in self.factors.items()}

    def adapter_delta(self) -> Delta:
        """s B̄ Ā over the base, which already holds the residuals."""
        return {n: [LowRank(f.B * self.scale, f.A)] for n, f in self.factors.items()}
