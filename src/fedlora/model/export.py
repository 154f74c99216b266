"""The global model's update as a standard PEFT LoRA adapter folder (safetensors).

Each layer's low-rank terms are compressed exactly (QR + small SVD) to one pair of rank
≤ min(Σr, d_out, d_in), zero-padded to a common rank, and saved with lora_alpha = r so PEFT's
scale is 1: `PeftModel.from_pretrained(base, folder)` reproduces W_0 + ΔW_g.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedlora.methods.base import Delta, Factors
from fedlora.model.adapters import AdapterHost
from fedlora.ops.lowrank import compress, pad


def delta_to_factors(delta: Delta) -> tuple[int, dict[str, Factors]]:
    """One (B, A) per layer with a shared rank R and B A = Σ terms (float64 math, float32 out)."""
    pairs = {n: compress([t.to(torch.float64) for t in terms], rtol=1e-12) for n, terms in delta.items() if terms}
    rank = max(1, max((p.rank for p in pairs.values()), default=1))
    out = {}
    for name, p in pairs.items():
        B, A = pad(p.B, p.A, rank)
        out[name] = Factors(B=B.float(), A=A.float())
    return rank, out


def save_adapter(host: AdapterHost, delta: Delta, target_modules: list[str], folder: Path, base_path: str) -> int:
    """Write adapter_config.json + adapter_model.safetensors; returns the adapter rank."""
    rank, factors = delta_to_factors(delta)
    for name, (d_out, d_in) in _shapes(host).items():
        factors.setdefault(name, Factors(B=torch.zeros(d_out, rank), A=torch.zeros(rank, d_in)))
    with host.adapter(rank, 1.0, target_modules, init=factors) as peft_model:
        peft_model.peft_config["default"].base_model_name_or_path = base_path
        peft_model.save_pretrained(folder, safe_serialization=True)
    return rank


def _shapes(host: AdapterHost) -> dict[str, tuple[int, int]]:
    modules = dict(host.model.named_modules())
    return {n: (modules[n].out_features, modules[n].in_features) for n in host.layer_names}
