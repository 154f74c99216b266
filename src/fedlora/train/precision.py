"""Mixed precision for local training and evaluation (``train.precision``).

Under ``bfloat16`` the forward and backward matrix multiplies run in bfloat16 through
``torch.autocast`` while the weights, the LoRA factors, their gradients and AdamW's state stay in
the model's dtype (float32 master weights); what the client uploads is float32 as ever, so the
aggregation math does not change. ``auto`` picks bfloat16 where the hardware multiplies in it
natively — CUDA devices with bf16 support, CPUs that report AVX512-BF16 or AMX — and float32
elsewhere. ``float16`` (for GPUs without bfloat16) autocasts to float16 and scales the loss
(``torch.amp.GradScaler``) so that small gradients do not flush to zero; a step whose gradients
overflow is skipped and the scale lowered, as in every float16 recipe.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import ContextManager

import torch


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo)."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None is plain float32 (no autocast)."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "float16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> "torch.amp.GradScaler | None":
    """A loss scaler for float16 training; None for float32 and bfloat16 (bfloat16 has float32's range)."""
    # 2^10, not torch's 2^16: a scaler lives for one client's few local steps, and every overflow at the start skips one
    return torch.amp.GradScaler(device.type, init_scale=2.0**10) if dtype == torch.float16 else None


def autocast(dtype: torch.dtype | None, device: torch.device) -> ContextManager:
    """``torch.autocast`` at ``dtype`` on the device's type, or nothing for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
