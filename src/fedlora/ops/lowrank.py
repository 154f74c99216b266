"""Pure tensor math on low-rank factors: tensors in, tensors out.

Conventions (methods.md §0): for one adapted linear layer with weight W (d_out × d_in),
a low-rank term is a pair (B, A) with B: (d_out × r) and A: (r × d_in) whose product B @ A
is added to W. Any scale is already folded into the pair. A weight delta whose low-rank form
would be larger than the matrix itself is a ``Dense`` term (methods.md §4); ``Term`` is either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class LowRank:
    """A low-rank weight delta ``B @ A``; B: (d_out, r), A: (r, d_in), scale folded in."""

    B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:
        assert self.B.dim() == 2 and self.A.dim() == 2, "factors must be matrices"
        assert self.B.shape[1] == self.A.shape[0], f"rank mismatch: B {tuple(self.B.shape)} A {tuple(self.A.shape)}"

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def scaled(self, c: float) -> "LowRank":
        return LowRank(self.B * c, self.A)

    def to(self, dtype: torch.dtype) -> "LowRank":
        return LowRank(self.B.to(dtype), self.A.to(dtype))

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    @property
    def size(self) -> int:
        """Numbers held: r (d_out + d_in)."""
        return self.rank * (self.B.shape[0] + self.A.shape[1])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.B, self.A


@dataclass(frozen=True)
class Dense:
    """A weight delta held as the d_out × d_in matrix: smaller than any low-rank form of rank ≥ d_out d_in / (d_out + d_in)."""

    W: torch.Tensor

    def __post_init__(self) -> None:
        assert self.W.dim() == 2, "a dense delta is a matrix"

    @property
    def rank(self) -> int:
        """The bound min(d_out, d_in): what it counts for in a sum of ranks."""
        return min(self.W.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return self.W.shape[0], self.W.shape[1]

    @property
    def size(self) -> int:
        return self.W.numel()

    def dense(self) -> torch.Tensor:
        return self.W

    def to(self, dtype: torch.dtype) -> "Dense":
        return Dense(self.W.to(dtype))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.W,)


Term = LowRank | Dense


def dense_size(shape: tuple[int, int]) -> int:
    return shape[0] * shape[1]


def accumulate(out: torch.Tensor, term: Term, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha · term, in place, in out's dtype and device (the one way every copy of a base adds a merge)."""
    if isinstance(term, Dense):
        return out.add_(term.W.to(out.device, out.dtype), alpha=alpha)
    return out.addmm_(term.B.to(out.device, out.dtype), term.A.to(out.device, out.dtype), alpha=alpha)


def densify(terms: Sequence[Term], shape: tuple[int, int], dtype: torch.dtype) -> Dense:
    """Σ terms as one dense matrix, added in order from zero (so every holder of the same terms gets the same bits)."""
    out = torch.zeros(shape, dtype=dtype, device=terms[0].tensors()[0].device if terms else None)
    for t in terms:
        accumulate(out, t)
    return Dense(out)


def smallest_form(term: Term) -> Term:
    """The same delta in whichever of the low-rank and dense forms holds fewer numbers."""
    if isinstance(term, LowRank) and term.size >= dense_size(term.shape):
        return Dense(term.B @ term.A)
    return term


def add_term(terms: list[Term], term: Term) -> list[Term]:
    """The terms of a sum with one more added, held in bounded form (methods.md §4).

    Low-rank terms are kept side by side while together they hold fewer numbers than the
    matrix; from then on the sum is one ``Dense`` matrix, and each new term is added to a copy
    of it (the old list stays valid: diagnostics compare the sums before and after a round).
    """
    if terms and isinstance(terms[0], Dense):
        return [Dense(accumulate(terms[0].W.clone(), term))]
    new = [*terms, term]
    shape = term.shape
    if sum(t.size for t in new) >= dense_size(shape):
        return [densify(new, shape, accumulation_dtype(term.tensors()[0].dtype))]
    return new


def stack(terms: Sequence[LowRank], coefs: Sequence[float] | None = None) -> LowRank:
    """One pair whose product is Σ_k c_k B_k A_k: [B_1 … B_K] @ [c_1 A_1; …; c_K A_K] (c_k = 1 without ``coefs``).

    Each factor is written once into the final tensors, its coefficient applied on the way (one pass over each term).
    """
    assert terms, "stack needs at least one term"
    assert all(isinstance(t, LowRank) for t in terms), "a dense term has no factors to stack"
    if coefs is None:
        return LowRank(torch.cat([t.B for t in terms], dim=1), torch.cat([t.A for t in terms], dim=0))
    total = sum(t.rank for t in terms)
    B = torch.empty(terms[0].B.shape[0], total, dtype=terms[0].B.dtype)
    A = torch.empty(total, terms[0].A.shape[1], dtype=terms[0].A.dtype)
    i = 0
    for t, c in zip(terms, coefs, strict=True):
        B[:, i : i + t.rank].copy_(t.B)
        torch.mul(t.A, float(c), out=A[i : i + t.rank])
        i += t.rank
    return LowRank(B, A)


def pad(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad B with columns and A with rows up to ``rank``; the product is unchanged."""
    r = A.shape[0]
    assert r <= rank, f"cannot pad rank {r} down to {rank}"
    B_p = torch.zeros(B.shape[0], rank, dtype=B.dtype, device=B.device)
    A_p = torch.zeros(rank, A.shape[1], dtype=A.dtype, device=A.device)
    B_p[:, :r] = B
    A_p[:r] = A
    return B_p, A_p


def truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rank`` components: (B[:, :rank], A[:rank])."""
    return B[:, :rank].clone(), A[:rank].clone()


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_k T_k for same-shaped tensors, in the first one's dtype; one output, summed in place."""
    assert len(tensors) == len(weights) and tensors, "one weight per tensor"
    out = tensors[0] * float(weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=float(w))
    return out


def padded_sum(mats: Sequence[torch.Tensor], weights: Sequence[float], rank: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Σ w_k pad(M_k): each M_k's r_k slices along ``dim`` added in place into a rank-``rank`` output.

    ``dim`` 1 for B factors (columns), 0 for A factors (rows); the same numbers as padding every
    M_k with zeros to ``rank`` first and averaging, without the K padded copies.
    """
    assert len(mats) == len(weights) and mats, "one weight per factor"
    shape = list(mats[0].shape)
    shape[dim] = rank
    out = torch.zeros(shape, dtype=dtype, device=mats[0].device)
    for m, w in zip(mats, weights):
        assert m.shape[dim] <= rank, f"cannot pad rank {m.shape[dim]} down to {rank}"
        out.narrow(dim, 0, m.shape[dim]).add_(m, alpha=float(w))
    return out


def frob_norm(terms: Sequence[LowRank]) -> float:
    """‖Σ_i B_i A_i‖_F without forming the dense d_out × d_in sum (methods.md §2).

    Stack the terms into one pair (B, A), take B = Q_B R_B and Aᵀ = Q_A R_A; then
    ‖BA‖_F = ‖R_B R_Aᵀ‖_F, a (Σr × Σr) matrix. Unlike the Gram identity
    Σ_{i,j} tr((B_iᵀB_j)(A_jA_iᵀ)) nothing is squared, so a sum whose terms cancel (an
    exact method's aggregation error) comes out at float round-off, not its square root.
    """
    if not terms:
        return 0.0
    if any(isinstance(t, Dense) for t in terms):
        return float(torch.linalg.matrix_norm(densify(terms, terms[0].shape, terms[0].tensors()[0].dtype).W))
    s = stack(terms)
    if s.rank >= min(s.B.shape[0], s.A.shape[1]):  # no saving left: the dense form is cheaper
        return float(torch.linalg.matrix_norm(s.B @ s.A))
    _, r_b = torch.linalg.qr(s.B)  # (min(d_out, Σr) × Σr)
    _, r_a = torch.linalg.qr(s.A.T)  # (min(d_in, Σr) × Σr)
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


def frob_norm_gram(terms: Sequence[LowRank]) -> float:
    """The Gram form Σ_{i,j} tr((B_iᵀ B_j)(A_j A_iᵀ)), square-rooted: exact enough for a term that
    cannot cancel (one client's, HETLoRA's norm weights), and a cross-check for frob_norm."""
    if not terms:
        return 0.0
    s = terms[0] if len(terms) == 1 else stack(terms)  # one term: no copy
    return float(((s.B.T @ s.B) * (s.A @ s.A.T).T).double().sum().clamp_min(0.0).sqrt())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or better: sums of weight deltas are never accumulated in bfloat16/float16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fold_terms(terms: Sequence[Term], like: torch.Tensor) -> torch.Tensor:
    """Dense Σ_i B_i A_i in ``like``'s dtype and device, accumulated in float32 or better."""
    out = torch.zeros(like.shape, dtype=accumulation_dtype(like.dtype), device=like.device)
    for t in terms:
        accumulate(out, t)
    return out.to(like.dtype)


def kaiming_A(rank: int, d_in: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh LoRA A as PEFT draws it: Kaiming-uniform with a = √5, i.e. U(−1/√d_in, 1/√d_in)."""
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from a tuple such as (run seed, round, client): order-independent draws."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def lowrank_svd(terms: Sequence[Term]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD U diag(S) Vh of Σ_i B_i A_i without the dense d_out × d_in matrix.

    With B = [B_1 …] = Q_B R_B and Aᵀ = Q_A R_A: BA = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the SVD of the
    small core R_B R_Aᵀ = U_c S V_cᵀ gives U = Q_B U_c, V = Q_A V_c. Shapes: U (d_out × k),
    S (k,), Vh (k × d_in), k = min(Σr, d_out, d_in). A sum holding a dense term is
    decomposed densely: it is no larger than its matrix.
    """
    pairs = [t for t in terms if isinstance(t, LowRank)]
    if len(pairs) < len(terms):  # a dense term
        u, sv, vh = torch.linalg.svd(densify(terms, terms[0].shape, terms[0].tensors()[0].dtype).W, full_matrices=False)
        return u, sv, vh
    s = stack(pairs)
    q_b, r_b = torch.linalg.qr(s.B)  # (d_out × k_b), (k_b × Σr)
    q_a, r_a = torch.linalg.qr(s.A.T)  # (d_in × k_a), (k_a × Σr)
    u_c, sv, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (k_b × k_a)
    return q_b @ u_c, sv, vh_c @ q_a.T


def compress(terms: Sequence[Term], rtol: float = 0.0) -> LowRank:
    """One pair of rank ≤ min(Σr, d_out, d_in) with the same product (singular values ≤ rtol·σ_max dropped)."""
    u, sv, vh = lowrank_svd(terms)
    keep = int((sv > rtol * sv.max()).sum()) if sv.numel() and rtol > 0 else sv.numel()
    return LowRank(u[:, :keep] * sv[:keep], vh[:keep])


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, vh) with each singular pair's sign fixed by the matrix alone: the largest-magnitude entry of u's column positive.

    An SVD routine's signs depend on the input it was given (here: how a sum was stacked); fixed this way they
    depend only on the matrix U S Vh (up to rotations inside exactly repeated singular values)."""
    if u.shape[1] == 0:
        return u, vh
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def sum_only_form(t: LowRank, rtol: float = 1e-12) -> Term:
    """The product B A in a form that is a function of the product alone, not of the terms it was stacked from.

    A stack [B_1 … B_K][c_1 A_1; …; c_K A_K] sent as it is hands every receiver each client's own B_k and A_k.
    Its thin SVD (U S, Vh) at its numerical rank (singular values ≤ rtol·σ_max dropped), with canonical signs,
    computed in float64 and returned in t's dtype, holds the same product and reveals only it: the same for any
    clients whose weighted products sum to the same matrix, to round-off. It is never wider than the stack, and
    is dense where that holds fewer numbers (``smallest_form``)."""
    dtype = t.B.dtype
    u, sv, vh = lowrank_svd([t.to(torch.float64)])
    keep = max(1, int((sv > rtol * sv.max()).sum())) if sv.numel() and float(sv.max()) > 0 else 1
    u, vh = canonical_signs(u[:, :keep], vh[:keep])
    return smallest_form(LowRank((u * sv[:keep]).to(dtype), vh.to(dtype)))


def within_layer_rank(t: LowRank) -> LowRank:
    """The same product at rank ≤ min(d_out, d_in).

    A stack of many clients' factors can be wider than the layer itself (1000 clients on a
    384-wide encoder: Σr = 7200); past that width a thin SVD, taken in float64 and returned in
    the input's dtype, holds the same matrix in less memory and fewer bytes on the wire.
    """
    if t.rank <= min(t.B.shape[0], t.A.shape[1]):
        return t
    return compress([t.to(torch.float64)]).to(t.B.dtype)

