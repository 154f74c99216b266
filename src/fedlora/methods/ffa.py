"""FFA-LoRA: federated LoRA with frozen A (Sun et al., "Improving LoRA in Privacy-preserving
Federated Learning", ICLR 2024).

Every client shares one A per layer (r × d_in), drawn once from the run seed with PEFT's
Kaiming-uniform init and frozen forever; only B (d_out × r) trains, starting from the global B̄.
Because A is common, averaging B is exact:

    B̄ = Σ_k p_k B_k,    Σ_k p_k s B_k A = s B̄ A,

so the global update is s·B̄A with zero aggregation noise (methods.md §1, §3 item 10). It needs
one rank (per layer) and one scale for every client.

Wire: A never crosses it. The plan carries B̄ (d_out × r per layer, even while it is 0) and the
A seed as one int64; ``client_prepare`` regenerates A on the client. Uplink is B only.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from fedlora.methods.base import ClientPlan, Delta, Factors, Setup, plan_for_layers
from fedlora.methods.reference import ideal
from fedlora.methods.registry import register
from fedlora.methods.checks import heterogeneous, one_rank, one_scale
from fedlora.methods.errors import MethodError
from fedlora.methods.sums import SumsB
from fedlora.methods.options import read_options
from fedlora.ops.lowrank import LowRank, kaiming_A, seeded_generator

A_TAG = 0xFFA
"""Separates the shared-A draw from every other use of the run seed."""

SEED_KEY = "A_seed"
B_KEY = "B_bar:"  # + layer name


def shared_A(seed: int, layer: str, rank: int, d_in: int, dtype: torch.dtype) -> torch.Tensor:
    """The frozen A of one layer (rank × d_in): a function of (seed, layer name) only, not of layer order."""
    return kaiming_A(rank, d_in, seeded_generator(seed, A_TAG, zlib.crc32(layer.encode())), dtype)


@register
class FFALoRA(SumsB):
    name = "ffa"
    summary = "A drawn once from a shared seed and frozen; only B trains and is averaged (exact)."

    options: dict = {}
    state_keys = ("B",)  # A is a function of the seed
    ranks = "one"
    scales = "one"
    exact = True  # A is shared: Σ p_k s B_k A = s B̄ A
    sums_only = True  # Σ w_k B_k
    reference = ideal

    def __init__(self, setup: Setup) -> None:
        read_options(self.name, self.options, setup.options)
        self.setup = setup
        self.scale = one_scale(self.name, setup)
        for name in setup.layers:
            if len(per_layer := sorted({setup.rank_of(k, name) for k in setup.ranks})) == 1:
                continue
            if len(set(setup.ranks.values())) != 1:
                one_rank(self.name, Setup(setup.layers, setup.ranks, setup.scales))  # the one-rank error
            raise MethodError(
                f"lora.rank_patterns: 'ffa' needs every client to share each layer's rank, got {per_layer} on {name} "
                f"(accepted: one pattern for all clients, or a heterogeneous method: {heterogeneous()})"
            )
        self.rank = {name: setup.rank_of(next(iter(setup.ranks)), name) for name in setup.layers}
        self.A = self._draw_A(setup.seed)
        self.B: dict[str, torch.Tensor] = {
            name: torch.zeros(d_out, self.rank[name], dtype=setup.dtype) for name, (d_out, _) in setup.layers.items()
        }

    def _draw_A(self, seed: int) -> dict[str, torch.Tensor]:
        return {name: shared_A(seed, name, self.rank[name], d_in, self.setup.dtype) for name, (_, d_in) in self.setup.layers.items()}

    def plan(self, client: int, round: int) -> ClientPlan:
        """B̄ (d_out × r) per layer and the A seed; no A."""
        rank, pattern = plan_for_layers(self.setup, client)
        meta: dict[str, torch.Tensor] = {SEED_KEY: torch.tensor(self.setup.seed, dtype=torch.int64)}
        meta.update({B_KEY + name: B.clone() for name, B in self.B.items()})
        return ClientPlan(client=client, round=round, rank=rank, rank_pattern=pattern, scale=self.scale, train_A=False, meta=meta)

    def client_prepare(self, plan: ClientPlan) -> ClientPlan:
        """Client side: regenerate A from the seed; the adapter starts at (B̄, A) with A frozen."""
        A = self._draw_A(int(plan.meta[SEED_KEY]))
        init = {name: Factors(B=plan.meta[B_KEY + name].clone(), A=A[name]) for name in self.setup.layers}
        meta = {k: v for k, v in plan.meta.items() if not k.startswith(B_KEY)}
        return dataclasses.replace(plan, init=init, train_A=False, meta=meta)

    def global_delta(self) -> Delta:
        return {name: [LowRank(self.B[name] * self.scale, self.A[name])] for name in self.setup.layers}
