"""Fed-PLoRA: parallel one-rank modules with Select-N-Fold (ICLR 2026; methods.md §1).

Each adapted layer's global adapter is R parallel one-rank modules (b_j ∈ R^{d_out},
a_j ∈ R^{d_in}), j = 1..R, with one scale s for all of them: ΔW = s Σ_j b_j a_jᵀ = s B_g A_g,
where column j of B_g (d_out × R) is b_j and row j of A_g (R × d_in) is a_jᵀ. So a rank-R LoRA
*is* R modules; nothing changes by splitting it.

Round t, client k (rank r_k ≤ R):
1. Select r_k indices K ⊆ {0..R−1} (``selection: random``: uniform without replacement from a
   generator seeded by (run seed, round, client), sorted; ``first``: 0..r_k−1). The same K is
   used on every layer: it is the client's choice of modules, as in the paper.
2. Fold the rest into the frozen weight for this round only: W_k = W_0 + s B_g[:, U] A_g[U],
   U = complement of K (``plan.fold``).
3. Train a rank-r_k LoRA with scale s initialised from (B_g[:, K], A_g[K]); its model at step 0
   is exactly the global model (zero initialisation noise).
4. Upload the trained factors and K (``client_finish`` copies the indices into the update).

Server, per module j: (b_j, a_j) ← Σ_{k∋j} w_kj (b_j^k, a_j^k) over the clients C_j that trained
j, with w_kj = 1/|C_j| (``weights: uniform``, the default and the paper's analysis) or
p_k / Σ_{i∈C_j} p_i (``weights: data``); modules nobody trained keep their values. With every
r_k = R this is FedIT.

Wire: downlink R(d_in + d_out) per layer (r_k modules in ``init``, R − r_k in ``fold``) plus
the r_k int64 indices; uplink r_k(d_in + d_out) per layer plus the indices.
"""

from __future__ import annotations

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Method, Setup, fresh_factors
from fedlora.methods.reference import none
from fedlora.methods.registry import register
from fedlora.methods.errors import MethodError
from fedlora.methods.options import WEIGHT_CAP, Option, read_options, weighting
from fedlora.ops.lowrank import LowRank, seeded_generator
from fedlora.methods.similarity import module_similarity


@register
class FedPLoRA(Method):
    name = "fedplora"
    summary = "R parallel one-rank modules; each client trains r_k of them and folds the rest (zero init noise)."

    options = {
        "selection": Option("random", "which r_k modules a client trains: random (re-drawn every round) or first", choices=("random", "first")),
        "weights": Option("uniform", "per-module average: 1/|C_j| (uniform), or w_k = n_k (data) or min(n_k, weight_cap) (capped) renormalised over C_j",
                          choices=("uniform", "data", "capped")),
        "weight_cap": WEIGHT_CAP,
        "modules": Option(0, "number R of one-rank modules per layer; 0 means max lora.ranks", low=0),
    }

    state_keys = ("factors",)
    scales = "one"  # one s for every module and client
    exact = False  # each module is averaged over the clients that trained it: not Σ p_k s B_k A_k
    sums_only = False  # per-module sums over the clients that chose the module: sums-only once clients upload all R modules with a mask
    reference = none

    def __init__(self, setup: Setup) -> None:
        opts = read_options(self.name, self.options, setup.options)
        if setup.rank_patterns:
            raise MethodError(
                "lora.rank_patterns: fedplora needs one rank per client on every layer, since a client selects the same "
                "modules on each layer (accepted: none, or method flora)"
            )
        scales = sorted(set(setup.scales.values()))
        if len(scales) != 1:
            raise MethodError(f"lora.scale: fedplora needs one scale s for every module and client, got {scales} (accepted: one lora.scale)")
        max_rank = max(setup.ranks.values())
        modules = opts["modules"]
        if float(modules) != int(modules) or (modules and modules < max_rank):
            raise MethodError(
                f"federation.options.modules: invalid value {modules!r} for fedplora "
                f"(accepted: an integer >= max lora.ranks = {max_rank}, or 0 for max lora.ranks)"
            )
        self.setup = setup
        self.R = self.modules = int(modules) or max_rank
        self.scale = scales[0]
        self.random = opts["selection"] == "random"
        self.weighting = weighting(self.name, opts)
        self.factors: dict[str, Factors] = fresh_factors(setup.layers, self.R, setup.seed, setup.dtype)  # round 0: PEFT init for all R modules
        """Per layer (B_g: d_out × R, A_g: R × d_in); module j is (B_g[:, j], A_g[j])."""

    def indices(self, client: int, round: int) -> torch.Tensor:
        """Client k's selected modules K in round t: sorted int64, length r_k, same for every layer."""
        r = self.setup.ranks[client]
        if not self.random:
            return torch.arange(r, dtype=torch.int64)
        perm = torch.randperm(self.R, generator=seeded_generator(self.setup.seed, round, client))
        return perm[:r].sort().values.to(torch.int64)

    def plan(self, client: int, round: int) -> ClientPlan:
        """Select-N-Fold: train modules K from their global values, fold the others into W."""
        K = self.indices(client, round)
        keep = torch.ones(self.R, dtype=torch.bool)
        keep[K] = False
        U = keep.nonzero().flatten()  # unselected modules, ascending
        init: dict[str, Factors] = {}
        fold: Delta = {}
        for name, f in self.factors.items():
            init[name] = Factors(B=f.B[:, K].clone(), A=f.A[K].clone())  # (d_out × r_k), (r_k × d_in)
            if U.numel():
                fold[name] = [LowRank(f.B[:, U] * self.scale, f.A[U].clone())]  # s B_U A_U, (d_out × |U|)(|U| × d_in)
        return ClientPlan(
            client=client, round=round, rank=len(K), scale=self.scale, init=init, fold=fold, meta={"indices": K},
        )

    def client_finish(self, plan: ClientPlan, update: ClientUpdate) -> ClientUpdate:
        """The upload carries its module indices, so the server knows which modules it trained."""
        update.meta["indices"] = plan.meta["indices"].clone()
        return update

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> list[float]:
        """Per-module average over the clients that trained it; untrained modules are kept bit for bit.

        Each client's coefficient on module j is normalised first (w_kj = w_k / Σ_{i∈C_j} w_i),
        so a module trained by one client gets coefficient exactly 1 and is copied exactly. If
        every trainer of j has p_k = 0 under ``weights: data``, j is averaged uniformly.
        """
        weights = self.weighting.applied(weights)
        chosen = [self._indices_of(u) for u in updates]
        den = torch.zeros(self.R, dtype=torch.float64)
        count = torch.zeros(self.R, dtype=torch.float64)
        for K, w in zip(chosen, weights):
            den[K] += float(w)
            count[K] += 1.0
        trained = count > 0
        coefs = [torch.where(den[K] > 0, float(w) / den[K].clamp_min(1e-300), 1.0 / count[K]) for K, w in zip(chosen, weights)]
        untrained = (~trained).nonzero().flatten()
        for name, f in self.factors.items():
            B, A = torch.zeros_like(f.B), torch.zeros_like(f.A)
            for u, K, c in zip(updates, chosen, coefs):
                c = c.to(f.B.dtype)
                B.index_add_(1, K, u.factors[name].B.to(f.B.dtype) * c)  # Σ_k w_kj b_j^k into columns K: (d_out × r_k)
                A.index_add_(0, K, u.factors[name].A.to(f.A.dtype) * c[:, None])  # rows K: (r_k × d_in); the state keeps its dtype
            if untrained.numel():  # modules nobody trained keep their values
                B.index_copy_(1, untrained, f.B.index_select(1, untrained))
                A.index_copy_(0, untrained, f.A.index_select(0, untrained))
            self.factors[name] = Factors(B=B, A=A)
        return weights  # per client; each module renormalises them over the clients that trained it

    def _indices_of(self, update: ClientUpdate) -> torch.Tensor:
        K = update.meta.get("indices")
        if not isinstance(K, torch.Tensor):
            raise ValueError(f"client {update.client}: fedplora update carries no module indices (run client_finish)")
        K = K.to(torch.int64)
        ranks = {f.rank for f in update.factors.values()}
        if K.dim() != 1 or ranks != {K.numel()} or K.unique().numel() != K.numel() or bool(((K < 0) | (K >= self.R)).any()):
            raise ValueError(f"client {update.client}: module indices {K.tolist()} do not fit factor ranks {sorted(ranks)} and R = {self.R}")
        return K

    def round_metrics(self, updates: list[ClientUpdate]) -> dict:
        """How alike the clients' modules of the same and of different indices are (the paper's Figure 2)."""
        return {"module_similarity": module_similarity(updates)}

    def global_delta(self) -> Delta:
        """s Σ_j b_j a_jᵀ = s B_g A_g per layer."""
        return {n: [LowRank(f.B * self.scale, f.A)] for n, f in self.factors.items()}
