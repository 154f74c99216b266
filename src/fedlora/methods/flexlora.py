"""FlexLoRA: SVD redistribution of the global LoRA update (Bai et al., NeurIPS 2024).

Server state per layer: ΔW_g = Σ_k p_k s_k B_k A_k, the latest round's aggregated update, kept
as one stacked pair B_stack = [B_1 … B_K] (d_out × Σr_k), A_stack = [p_1 s_1 A_1; …; p_K s_K A_K]
(Σr_k × d_in), so B_stack A_stack equals the weighted sum exactly. It is neither merged into the
base nor densified: the global model is W_0 + ΔW_g, untruncated.

Client k starts from the rank-r_k truncated SVD ΔW_g ≈ U_r diag(σ_1..σ_r) V_rᵀ (r = r_k on that
layer, ``Setup.rank_of``): B'_k = U_r diag(σ) / s_k (d_out × r), A'_k = V_rᵀ (r × d_in), so
‖ΔW_g − s_k B'_k A'_k‖_F = sqrt(Σ_{i>r} σ_i²) (Eckart–Young). The SVD comes from
``lowrank_svd`` (QR of the stacked factors, SVD of the Σr × Σr core), never from the dense
d_out × d_in matrix, and it is computed once per round, lazily, at the widest rank any client
holds on that layer; each client gets a prefix of it.

Choices methods.md leaves open:
- Round 1 (ΔW_g = 0 before any aggregation): a fresh PEFT adapter (``init`` None, B = 0), as in
  the paper; nothing crosses the downlink in that round.
- r_k > rank of the stack (k = min(Σr, d_out, d_in) singular triplets): the SVD is padded with
  zero singular values. B' gets zero columns; A' gets rows spanning an orthonormal complement of
  V (QR of a seeded Gaussian matrix projected off V), not zero rows: a zero row of A with a zero
  column of B is a dead component (both gradients vanish), whereas a zero B column with a unit
  A row trains like a fresh LoRA component. A' therefore always has orthonormal rows, which
  needs r_k ≤ d_in (checked, with r_k ≤ d_out, at construction).
- The SVD is taken in float64 for float64 setups and float32 otherwise; plans are cast to
  ``Setup.dtype``.
"""

from __future__ import annotations

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Method, Setup, plan_for_layers
from fedlora.methods.reference import ideal
from fedlora.methods.registry import register
from fedlora.methods.errors import MethodError
from fedlora.methods.options import read_options, weighting, WEIGHTING
from fedlora.ops.lowrank import LowRank, lowrank_svd, seeded_generator, stack, truncate


@register
class FlexLoRA(Method):
    name = "flexlora"
    summary = "Average s_k B_k A_k exactly; each client restarts from the rank-r_k truncated SVD of that global update."

    options = {
        **WEIGHTING,
    }

    state_keys = ("delta", "round")
    exact = True  # ΔW_g is Σ p_k s_k B_k A_k, stacked
    sums_only = False  # the stack needs each client's own B_k and A_k
    reference = ideal

    def __init__(self, setup: Setup) -> None:
        opts = read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.weighting = weighting(self.name, opts)
        self.widest: dict[str, int] = {}  # layer → max_k r_k: the width of the cached SVD
        for name, (d_out, d_in) in setup.layers.items():
            for k in setup.ranks:
                if (r := setup.rank_of(k, name)) > min(d_out, d_in):
                    where = "lora.ranks" if r == setup.ranks[k] else "lora.rank_patterns"
                    raise MethodError(f"{where}: flexlora cannot give client {k} rank {r} on layer {name} ({d_out}×{d_in}) (accepted: 1..{min(d_out, d_in)})")
            self.widest[name] = max((setup.rank_of(k, name) for k in setup.ranks), default=0)
        self.work_dtype = torch.promote_types(setup.dtype, torch.float32)
        self.delta: dict[str, LowRank] = {}  # ΔW_g per layer; empty until the first aggregation
        self.round = 0  # the round that produced ΔW_g
        self._basis: dict[str, LowRank] | None = None  # cached U diag(σ), Vᵀ at width ``widest``

    def plan(self, client: int, round: int) -> ClientPlan:
        rank, pattern = plan_for_layers(self.setup, client)
        scale = self.setup.scales[client]
        init = None
        if self.delta:
            init = {}
            for name, basis in self.basis().items():
                B, A = truncate(basis.B, basis.A, self.setup.rank_of(client, name))  # (d_out × r_k), (r_k × d_in)
                init[name] = Factors(B=(B / scale).to(self.setup.dtype), A=A.to(self.setup.dtype))
        return ClientPlan(client=client, round=round, rank=rank, rank_pattern=pattern, scale=scale, init=init)

    def aggregate(self, updates: list[ClientUpdate], weights: list[float], round: int) -> list[float]:
        weights = self.weighting.applied(weights)
        dt = self.setup.dtype  # each upload in the state's dtype before p_k s_k scales its A (bfloat16 uploads: no bfloat16 rounding of p_k s_k A_k)
        self.delta = {
            name: stack([LowRank(u.factors[name].B, u.factors[name].A).to(dt) for u in updates], [u.scale * p for u, p in zip(updates, weights)])
            for name in self.setup.layers
        }  # per layer (d_out × Σr_k) @ (Σr_k × d_in) = Σ p_k s_k B_k A_k
        self.round = round
        self._basis = None
        return weights

    def after_load(self) -> None:
        """The SVD cache belongs to the state it was computed from."""
        self._basis = None

    def global_delta(self) -> Delta:
        """G_t − W_0 = ΔW_g per layer (one stacked pair; no terms before the first aggregation)."""
        return {name: [self.delta[name]] if self.delta else [] for name in self.setup.layers}

    def basis(self) -> dict[str, LowRank]:
        """Per layer (U diag(σ), Vᵀ) of ΔW_g at the widest client rank, zero-padded; cached per round."""
        if self._basis is None:
            self._basis = {name: self._svd(i, name) for i, name in enumerate(self.setup.layers)}
        return self._basis

    def _svd(self, index: int, name: str) -> LowRank:
        width = self.widest[name]
        u, sv, vh = lowrank_svd([self.delta[name].to(self.work_dtype)])  # (d_out × k), (k,), (k × d_in)
        u, sv, vh = u[:, :width], sv[:width], vh[:width]
        missing = width - sv.numel()
        if missing > 0:  # fewer triplets than the widest rank: zero σ, orthonormal complement rows
            gen = seeded_generator(self.setup.seed, self.round, index)
            extra = _complement(vh, missing, gen)  # (missing × d_in)
            u = torch.cat([u, u.new_zeros(u.shape[0], missing)], dim=1)
            sv = torch.cat([sv, sv.new_zeros(missing)])
            vh = torch.cat([vh, extra], dim=0)
        return LowRank(u * sv, vh)  # (d_out × width), (width × d_in)


def _complement(vh: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` orthonormal rows (count × d_in) orthogonal to the orthonormal rows of ``vh``."""
    d_in = vh.shape[1]
    assert vh.shape[0] + count <= d_in, f"no room for {count} more directions beside {vh.shape[0]} in dimension {d_in}"
    x = torch.randn(d_in, count, generator=gen, dtype=torch.float64).to(device=vh.device, dtype=vh.dtype)  # (d_in × count)
    for _ in range(2):  # project off V twice: one pass loses orthogonality in float round-off
        x = x - vh.T @ (vh @ x)
    q, _ = torch.linalg.qr(x)  # (d_in × count), orthonormal columns in V's complement
    return q.T
