"""Reference formulas: what a method's global model is after one round from its start, densified (methods.md §1).

Each method points at one of these (``Method.reference``); the contract tests compare the
method's aggregate with it in float64 on random shapes, ranks, scales and weights
(tests/methods/test_properties.py). They are written from the specification with dense
matrices and nothing of the method's own code, so a method and its formula cannot share a bug.

Every formula takes the method, the layer, the round's uploaded factors (PEFT convention, no
scale folded in), each client's scale s_k and the weights p_k the method applied, and returns
the layer's G_1 − W_0, or None where there is no one formula to compare with.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fedlora.ops.lowrank import LowRank, pad

Factors = Sequence[LowRank]


def _sum(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(ts)).sum(0)


def ideal(method: Any, layer: str, f: Factors, s: Sequence[float], w: Sequence[float]) -> torch.Tensor:
    """Σ p_k s_k B_k A_k: the FedAvg ideal."""
    return _sum([p * sk * x.B @ x.A for p, sk, x in zip(w, s, f)])


def means(method: Any, layer: str, f: Factors, s: Sequence[float], w: Sequence[float]) -> torch.Tensor:
    """s (Σ p_k B_k)(Σ p_k A_k): the product of the means (one rank, one scale)."""
    return s[0] * _sum([p * x.B for p, x in zip(w, f)]) @ _sum([p * x.A for p, x in zip(w, f)])


def padded_means(method: Any, layer: str, f: Factors, s: Sequence[float], w: Sequence[float]) -> torch.Tensor:
    """(Σ p_k pad(s_k B_k)) (Σ p_k pad(A_k)), padded to the layer's largest rank."""
    R = max(method.setup.rank_of(k, layer) for k in method.setup.ranks)
    padded = [pad(x.B * sk, x.A, R) for x, sk in zip(f, s)]
    return _sum([p * B for p, (B, _) in zip(w, padded)]) @ _sum([p * A for p, (_, A) in zip(w, padded)])


def slot_means(method: Any, layer: str, f: Factors, s: Sequence[float], w: Sequence[float]) -> torch.Tensor:
    """s B̄ Ā, slot j of each the p-weighted mean over the clients whose rank exceeds j (one scale).

    A slot no client trained keeps B's start, 0, so its A does not reach the product."""
    R = max(method.setup.rank_of(k, layer) for k in method.setup.ranks)
    B, A = torch.zeros(f[0].B.shape[0], R, dtype=torch.float64), torch.zeros(R, f[0].A.shape[1], dtype=torch.float64)
    for j in range(R):
        held = [(p, x) for p, x in zip(w, f) if x.A.shape[0] > j]
        total = sum(p for p, _ in held)
        if total > 0:
            B[:, j] = _sum([p * x.B[:, j] for p, x in held]) / total
            A[j] = _sum([p * x.A[j] for p, x in held]) / total
    return s[0] * B @ A


def energy_truncated(method: Any, layer: str, f: Factors, s: Sequence[float], w: Sequence[float]) -> torch.Tensor:
    """The top-p SVD of Σ p_k s_k B_k A_k, p the smallest rank holding a share τ (``method.energy``) of Σσ²."""
    u, sv, vh = torch.linalg.svd(ideal(method, layer, f, s, w), full_matrices=False)
    cum, total = torch.cumsum(sv**2, 0), float((sv**2).sum())
    p = min(sv.numel(), int((cum < method.energy * total).sum()) + 1) if total > 0 else 1
    return (u[:, :p] * sv[:p]) @ vh[:p]


def first_client(method: Any, layer: str, f: Factors, s: Sequence[float], w: Sequence[float]) -> torch.Tensor:
    """s B A of the one client (the centralized reference: one client trains on everybody's data)."""
    return s[0] * f[0].B @ f[0].A


def none(method: Any, layer: str, f: Factors, s: Sequence[float], w: Sequence[float]) -> None:
    """No one formula: a personal method (each client's own model, checked with ``client_delta``) or one checked
    piece by piece in its own tests (Fed-PLoRA's modules depend on which client trained which)."""
    return None
