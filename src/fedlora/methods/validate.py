"""Server-side checks of a client update before it may touch the global state.

A client is not trusted: its reply is checked against the plan the server sent it — the
expected layers, shapes that fit the declared rank, a rank within bounds, Fed-PLoRA module
indices that are the ones selected, finite values and a norm bound (‖B‖_F, ‖A‖_F and s‖B‖_F‖A‖_F ≥ ‖sBA‖_F,
cheap even for full-weight updates). ``check_update`` returns
the first reason to reject the update (one line) or None; the round leaves a rejected update
out. Pure: tensors in, a sentence out, the same for the simulator and Flower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, LayerShapes

FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Bounds:
    """What the server accepts: the layers, the norm bound, how far ranks may shrink, R."""

    layers: LayerShapes
    max_norm: float
    min_rank: int | None = None  # None: exactly the plan's rank; else ranks in min_rank..plan's (HETLoRA pruning, AdaLoRA)
    modules: int | None = None  # Fed-PLoRA: the number R of one-rank modules per layer


class Rejected(ValueError):
    """One reason, internal to ``check_update``."""


def check_update(update: Any, plan: ClientPlan, bounds: Bounds) -> str | None:
    """None when ``update`` is an acceptable reply to ``plan``, else why it is not."""
    try:
        _check(update, plan, bounds)
    except Rejected as e:
        return str(e)
    return None


def _check(update: Any, plan: ClientPlan, b: Bounds) -> None:
    if not isinstance(update, ClientUpdate):
        raise Rejected(f"not a client update but {type(update).__name__}")
    if update.client != plan.client:
        raise Rejected(f"reply for client {update.client!r} to the plan of client {plan.client}")
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise Rejected(f"num_examples {n!r} is not a non-negative integer")
    if not isinstance(update.scale, (int, float)) or float(update.scale) != float(plan.scale):
        raise Rejected(f"scale {update.scale!r}, expected the plan's {plan.scale}")
    if not isinstance(update.factors, Mapping):
        raise Rejected(f"factors is {type(update.factors).__name__}, expected a mapping of layers")
    missing, extra = sorted(set(b.layers) - set(update.factors)), sorted(set(update.factors) - set(b.layers))
    if missing:
        raise Rejected(f"missing layer {missing[0]} ({len(missing)} missing)")
    if extra:
        raise Rejected(f"unexpected layer {str(extra[0])[:200]!r}")
    for name, (d_out, d_in) in b.layers.items():
        _check_layer(name, update.factors[name], plan.rank_pattern.get(name, plan.rank), d_out, d_in, float(plan.scale), b)
    if "indices" in plan.meta:
        _check_indices(update, plan, b)
    _check_head(update.head, plan.head)


def _tensor(where: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise Rejected(f"{where} is {type(t).__name__}, not a tensor")
    if t.dtype not in FLOATS:
        raise Rejected(f"{where} has dtype {str(t.dtype).removeprefix('torch.')} (accepted: float64, float32, bfloat16, float16)")
    if t.dim() != 2:
        raise Rejected(f"{where} has shape {tuple(t.shape)}, expected a matrix")
    if not bool(torch.isfinite(t).all()):
        raise Rejected(f"{where} holds NaN or Inf")
    return t


def _check_layer(name: str, f: Any, rank: int, d_out: int, d_in: int, scale: float, b: Bounds) -> None:
    B, A = _tensor(f"layer {name}: B", getattr(f, "B", None)), _tensor(f"layer {name}: A", getattr(f, "A", None))
    r = rank if b.min_rank is None else B.shape[1]
    if B.shape != (d_out, r):
        raise Rejected(f"layer {name}: B has shape {tuple(B.shape)}, expected ({d_out}, {r}) for rank {r}")
    if A.shape != (r, d_in):
        raise Rejected(f"layer {name}: A has shape {tuple(A.shape)}, expected ({r}, {d_in}) for rank {r}")
    low = 1 if b.min_rank is None else b.min_rank
    if not low <= r <= rank:
        raise Rejected(f"layer {name}: rank {r} outside {low}..{rank}, the plan's")
    nB, nA = _frob(B), _frob(A)
    for what, norm in (("B", nB), ("A", nA), ("s·B·A (bound s‖B‖‖A‖)", abs(scale) * nB * nA)):
        if not norm <= b.max_norm:
            raise Rejected(f"layer {name}: ‖{what}‖_F = {norm:.3g} exceeds federation.max_update_norm = {b.max_norm:g}")


def _frob(t: torch.Tensor) -> float:
    """In float64, so a bfloat16 or float32 tensor cannot overflow to a finite-looking inf."""
    norm = float(torch.linalg.matrix_norm(t.double())) if t.numel() else 0.0
    return norm if math.isfinite(norm) else math.inf


def _check_indices(update: ClientUpdate, plan: ClientPlan, b: Bounds) -> None:
    K = update.meta.get("indices") if isinstance(update.meta, Mapping) else None
    if not isinstance(K, torch.Tensor):
        raise Rejected("no module indices (Fed-PLoRA needs the indices it trained)")
    if K.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or K.dim() != 1:
        raise Rejected(f"module indices have dtype {str(K.dtype).removeprefix('torch.')} and shape {tuple(K.shape)}, expected 1-D integers")
    values = K.tolist()
    if len(set(values)) != len(values):
        raise Rejected(f"module indices {values[:20]} repeat a module")
    R = b.modules
    if R is not None and any(not 0 <= j < R for j in values):
        raise Rejected(f"module indices {values[:20]} outside 0..{R - 1}")
    if values != plan.meta["indices"].tolist():
        raise Rejected(f"module indices {values[:20]}, expected the selected {plan.meta['indices'].tolist()}")


def _check_head(head: Any, sent: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(head, Mapping) or set(head) != set(sent):
        raise Rejected(f"task head has parameters {sorted(head)[:5] if isinstance(head, Mapping) else head!r}, expected {sorted(sent)[:5]}")
    for name, t in head.items():
        if not isinstance(t, torch.Tensor) or t.shape != sent[name].shape or t.dtype not in FLOATS:
            raise Rejected(f"task head {name}: expected a float tensor of shape {tuple(sent[name].shape)}")
        if not bool(torch.isfinite(t).all()):
            raise Rejected(f"task head {name} holds NaN or Inf")
