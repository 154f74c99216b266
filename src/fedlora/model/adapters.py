"""One base model for every client: fold deltas into its target weights, attach a PEFT LoRA.

The target weights are always restored from a pristine copy, never by subtracting what was
added (subtraction drifts in float32/bf16). Factors are read and written by PEFT's names:
lora_A (r × d_in) and lora_B (d_out × r).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from fedlora.methods.base import Delta, Factors
from fedlora.ops.lowrank import fold_terms

ADAPTER = "default"


class AdapterHost:
    """Owns the base model and a pristine copy of its target weights."""

    def __init__(self, model: torch.nn.Module, layer_names: list[str]) -> None:
        self.model = model
        self.layer_names = list(layer_names)
        modules = dict(model.named_modules())
        self._linears = {n: modules[n] for n in self.layer_names}
        self._pristine = {n: m.weight.detach().clone() for n, m in self._linears.items()}

    def set_delta(self, delta: Delta) -> None:
        """Target weights := W_0 + Σ delta (layers absent from delta get W_0)."""
        with torch.no_grad():
            for name, linear in self._linears.items():
                w0 = self._pristine[name]
                terms = delta.get(name, [])
                linear.weight.copy_(w0 + fold_terms(terms, w0) if terms else w0)

    def restore(self) -> None:
        self.set_delta({})

    @contextmanager
    def adapter(
        self, rank: int, scale: float, target_modules: list[str], init: dict[str, Factors] | None = None,
        train_A: bool = True, seed: int = 0, dropout: float = 0.0, rank_pattern: dict[str, int] | None = None,
    ) -> Iterator[PeftModel]:
        """Attach a LoRA (rank r, lora_alpha = s·r) for the duration of the block, then remove it.

        ``rank_pattern`` gives some layers (full module paths) another rank, same scale s.
        A fresh adapter draws A with PEFT's own init under ``seed`` (B = 0); ``init`` overrides
        both factors. The base model comes back without LoRA layers; its weights are untouched.
        """
        pattern = {f"^{re.escape(n)}": r for n, r in (rank_pattern or {}).items()}
        config = LoraConfig(
            r=rank, lora_alpha=scale * rank, lora_dropout=dropout, target_modules=target_modules, bias="none",
            rank_pattern=pattern, alpha_pattern={k: scale * r for k, r in pattern.items()},
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(self.model, config)
        try:
            layers = self.lora_layers(peft_model)
            assert set(layers) == set(self.layer_names), "PEFT adapted a different set of layers"
            if init is not None:
                write_factors(layers, init)
            if not train_A:
                for layer in layers.values():
                    layer.lora_A[ADAPTER].weight.requires_grad_(False)
            yield peft_model
        finally:
            self.model = peft_model.unload()
            self.model.requires_grad_(False)

    @staticmethod
    def live_factors(peft_model: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The trainable (B, A) parameters by layer, for regularisers."""
        return {n: (m.lora_B[ADAPTER].weight, m.lora_A[ADAPTER].weight) for n, m in AdapterHost.lora_layers(peft_model).items()}

    @staticmethod
    def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
        """LoRA layers by base-model module path (PEFT's wrapper prefix stripped)."""
        inner = peft_model.base_model.model
        return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


def read_factors(layers: dict[str, LoraLayer]) -> dict[str, Factors]:
    """Detached float32 copies of every layer's (B, A) on the CPU."""
    return {
        name: Factors(
            B=layer.lora_B[ADAPTER].weight.detach().to("cpu", torch.float32).clone(),
            A=layer.lora_A[ADAPTER].weight.detach().to("cpu", torch.float32).clone(),
        )
        for name, layer in layers.items()
    }


def write_factors(layers: dict[str, LoraLayer], factors: dict[str, Factors]) -> None:
    with torch.no_grad():
        for name, layer in layers.items():
            f = factors[name]
            b, a = layer.lora_B[ADAPTER].weight, layer.lora_A[ADAPTER].weight
            assert b.shape == f.B.shape and a.shape == f.A.shape, f"{name}: factor shapes {tuple(f.B.shape)}, {tuple(f.A.shape)}"
            b.copy_(f.B)
            a.copy_(f.A)
