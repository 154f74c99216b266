"""The global model's update as a standard PEFT LoRA adapter folder (safetensors), or merged.

Each layer's low-rank terms are compressed exactly (QR + small SVD) to one pair of its own rank
≤ min(Σr, d_out, d_in) — never wider than the layer — saved with PEFT's ``rank_pattern`` where a
layer's rank is not the adapter's ``r`` and lora_alpha = r so PEFT's scale is 1:
`PeftModel.from_pretrained(base, folder)` reproduces W_0 + ΔW_g. Where the factors hold more
numbers than the dense update of those layers, the export says so (``--merged`` is smaller).

Where that exact rank is large (FLoRA stacks Σ r_k ranks per round), ``truncate`` keeps the
top r singular triplets of every layer, the best rank-r approximation (Eckart–Young), with
relative error ‖ΔW − B'A'‖_F / ‖ΔW‖_F = √(Σ_{i>r} σ_i²) / √(Σ_i σ_i²). One r for all layers
keeps the folder a plain adapter (one ``r`` in adapter_config.json, no rank pattern).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fedlora.filemode import as_umask
from fedlora.methods.base import Delta, Factors
from fedlora.model.adapters import ADAPTER, AdapterHost
from fedlora.model.loading import portable_base_name
from fedlora.ops.lowrank import LowRank, compress, lowrank_svd, pad

log = logging.getLogger(__name__)


def delta_to_factors(delta: Delta) -> dict[str, Factors]:
    """One (B, A) per layer at that layer's exact rank (≥ 1, ≤ min(d_out, d_in)) with B A = Σ terms (float64 math, float32 out)."""
    out = {}
    for name, terms in delta.items():
        if terms:
            p = compress([t.to(torch.float64) for t in terms], rtol=1e-12)
            B, A = pad(p.B, p.A, 1) if p.rank == 0 else (p.B, p.A)
            out[name] = Factors(B=B.float(), A=A.float())
    return out


def save_adapter(host: AdapterHost, delta: Delta, target_modules: list[str], folder: Path, base_path: str) -> int:
    """Write adapter_config.json + adapter_model.safetensors; returns the adapter's largest rank (its ``r``).

    ``base_model_name_or_path`` is the base's portable name (``portable_base_name``), not ``base_path``: the folder
    must mean the same on another machine. The card and fedlora_export.json carry the local path as a hint."""
    factors = delta_to_factors(delta)
    shapes = _shapes(host)
    for name, (d_out, d_in) in shapes.items():
        factors.setdefault(name, Factors(B=torch.zeros(d_out, 1), A=torch.zeros(1, d_in)))
    rank = max(f.rank for f in factors.values())
    pattern = {name: f.rank for name, f in factors.items() if f.rank != rank}
    numbers = sum(f.B.numel() + f.A.numel() for f in factors.values())
    dense = sum(d_out * d_in for d_out, d_in in shapes.values())
    if numbers > dense:
        log.warning("the adapter holds %.1f M numbers, more than the dense update of its layers (%.1f M): `fedlora export --merged` "
                    "writes W_0 + ΔW instead", numbers / 1e6, dense / 1e6)
    with host.adapter(rank, 1.0, target_modules, init=factors, rank_pattern=pattern) as peft_model:
        peft_model.peft_config["default"].base_model_name_or_path = base_path  # PEFT reads the base's config from it while saving
        peft_model.save_pretrained(folder, safe_serialization=True)
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": portable_base_name(Path(base_path))}, indent=2,
                                 sort_keys=True) + "\n")
    as_umask(folder)
    return rank


def load_adapter_delta(host: AdapterHost, folder: Path) -> Delta:
    """A saved LoRA adapter as float64 low-rank terms s·B·A per layer, read through PEFT's own loader."""
    peft_model = PeftModel.from_pretrained(host.model, folder)
    try:
        layers = AdapterHost.lora_layers(peft_model)
        delta = {}
        for name, layer in layers.items():
            B = layer.lora_B[ADAPTER].weight.detach().to("cpu", torch.float64)  # (d_out × r)
            A = layer.lora_A[ADAPTER].weight.detach().to("cpu", torch.float64)  # (r × d_in)
            delta[name] = [LowRank(B * float(layer.scaling[ADAPTER]), A)]
    finally:
        host.model = peft_model.unload()
    return delta


@dataclass(frozen=True)
class Spectrum:
    """One layer's ΔW = U diag(S) Vh, thin (k = its exact rank bound)."""

    U: torch.Tensor  # (d_out × k)
    S: torch.Tensor  # (k,)
    Vh: torch.Tensor  # (k × d_in)

    def rel_error(self, rank: int) -> float:
        """‖ΔW − ΔW_r‖_F / ‖ΔW‖_F for the best rank-r ΔW_r (0 for a zero ΔW)."""
        total = float((self.S**2).sum())
        return (float((self.S[rank:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0

    def exact_rank(self, rtol: float = 1e-12) -> int:
        return int((self.S > rtol * self.S.max()).sum()) if self.S.numel() and float(self.S.max()) > 0 else 0


def spectra(delta: Delta) -> dict[str, Spectrum]:
    """Every layer's thin SVD in float64, from its low-rank terms (never the dense matrix)."""
    return {n: Spectrum(*lowrank_svd([t.to(torch.float64) for t in terms])) for n, terms in delta.items() if terms}


def exact_rank(specs: dict[str, Spectrum]) -> int:
    """The rank an exact adapter needs: the largest layer's."""
    return max((s.exact_rank() for s in specs.values()), default=0)


def smallest_rank(specs: dict[str, Spectrum], tol: float) -> int:
    """The smallest one rank r at which every layer's relative error is ≤ tol."""
    top = max(1, exact_rank(specs))
    return next((r for r in range(1, top + 1) if all(s.rel_error(r) <= tol for s in specs.values())), top)


def truncate(specs: dict[str, Spectrum], rank: int) -> tuple[Delta, dict[str, float]]:
    """Every layer's best rank-r approximation (U_r S_r, Vh_r) and its relative error."""
    delta = {n: [LowRank(s.U[:, :rank] * s.S[:rank], s.Vh[:rank])] for n, s in specs.items()}
    return delta, {n: s.rel_error(rank) for n, s in specs.items()}


def overall_error(specs: dict[str, Spectrum], rank: int) -> float:
    """‖ΔW − ΔW_r‖_F / ‖ΔW‖_F over all layers together (their Frobenius norms summed in squares)."""
    total = sum(float((s.S**2).sum()) for s in specs.values())
    lost = sum(float((s.S[rank:] ** 2).sum()) for s in specs.values())
    return (lost / total) ** 0.5 if total > 0 else 0.0


def save_merged(host: AdapterHost, delta: Delta, tokenizer: Any, folder: Path) -> None:
    """W_0 + ΔW folded into the target weights, saved as a full HF folder with the tokenizer."""
    host.set_delta(delta)
    try:
        host.model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        as_umask(folder)
    finally:
        host.restore()


def _shapes(host: AdapterHost) -> dict[str, tuple[int, int]]:
    modules = dict(host.model.named_modules())
    return {n: (modules[n].out_features, modules[n].in_features) for n in host.layer_names}
