"""One base model for every client: fold deltas into its target weights, attach a PEFT LoRA.

The target weights are always restored from a pristine copy, never by subtracting what was
added (subtraction drifts in float32/bf16). Factors are read and written by PEFT's names:
lora_A (r × d_in) and lora_B (d_out × r).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from fedlora.methods.base import BaseUpdate, Delta, Factors
from fedlora.model.loading import ALL_LINEAR
from fedlora.ops.lowrank import accumulate, accumulation_dtype

ADAPTER = "default"


@dataclass(frozen=True)
class AdaLoraSpec:
    """AdaLoRA local adapters (Zhang et al., 2023): start at rank r, prune to ~target_r on average."""

    target_r: int
    total_step: int
    tfinal: int = 1
    orth_reg_weight: float = 0.5


class AdapterHost:
    """Owns the base model, a pristine copy of its target weights W_0 and its merged base.

    The frozen base is W_v = W_0 + D_v, D_v the merges of a merging method (FLoRA, zero-padding)
    up to version v, accumulated in float32 or better on the model's device, each merge added
    once and in the same order as the server adds it (``ops.lowrank.accumulate``), so D_v has
    the server's bits on one device. ``set_delta`` folds a delta over the base for one client or
    one evaluation; ``restore`` goes back to W_v by copying, never by subtracting.
    """

    def __init__(self, model: torch.nn.Module, layer_names: list[str], head_modules: list[str] | None = None) -> None:
        self.model = model
        self.layer_names = list(layer_names)
        modules = dict(model.named_modules())
        self._linears = {n: modules[n] for n in self.layer_names}
        self._pristine = {n: m.weight.detach().clone() for n, m in self._linears.items()}
        self._base: dict[str, torch.Tensor] = {}  # D_v per layer; empty while the base is W_0
        self._folded: set[str] = set()  # layers whose live weight is not W_v (a fold or a new base not yet written)
        self.version = 0
        # a task head (e.g. a classifier) trained densely by every client; PEFT's wrapping keeps these objects
        self._head = {f"{m}.{p}": t for m in head_modules or [] for p, t in modules[m].named_parameters()}

    def initial_head(self) -> dict[str, torch.Tensor]:
        """The head as loaded (seeded init): the server's starting point."""
        return self.read_head()

    def read_head(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in self._head.items()}

    def set_head(self, head: dict[str, torch.Tensor], trainable: bool = False) -> None:
        with torch.no_grad():
            for n, p in self._head.items():
                p.copy_(head[n])
                p.requires_grad_(trainable)

    def set_delta(self, delta: Delta) -> None:
        """Target weights := W_v + Σ delta (layers absent from delta get W_v), W_v the current base."""
        with torch.no_grad():
            for name, linear in self._linears.items():
                w0, base, terms = self._pristine[name], self._base.get(name), delta.get(name, [])
                if not terms and name not in self._folded:
                    continue  # already W_v: nothing to write
                if terms:
                    self._folded.add(name)
                else:
                    self._folded.discard(name)
                if base is None and not terms:
                    linear.weight.copy_(w0)
                    continue
                acc = base.clone() if base is not None else torch.zeros(w0.shape, dtype=accumulation_dtype(w0.dtype), device=w0.device)
                for t in terms:
                    accumulate(acc, t)
                linear.weight.copy_(w0 + acc.to(w0.dtype))

    def restore(self) -> None:
        """Target weights := W_v, the current base."""
        self.set_delta({})

    def catch_up(self, update: BaseUpdate | None) -> None:
        """Bring the base to the update's version: add each merge once, in place; a reset layer starts from W_0.

        ``None`` (a method that never merges) requires the pristine base: a base left by another run is refused.
        """
        if update is None:
            if self.version != 0:
                raise RuntimeError(f"model base at version {self.version}, but this method never merges: a base of another run?")
            return
        if update.version == self.version:
            return
        if update.since != self.version:
            raise RuntimeError(f"model base at version {self.version}, the update brings {update.since} to {update.version}")
        with torch.no_grad():
            for name, terms in [*update.reset.items(), *update.merges.items()]:
                w0 = self._pristine[name]
                if name in update.reset or name not in self._base:
                    self._base[name] = torch.zeros(w0.shape, dtype=accumulation_dtype(w0.dtype), device=w0.device)
                for t in terms:
                    accumulate(self._base[name], t)
                self._folded.add(name)  # the live weight is behind its new base
        self.version = update.version
        self.restore()

    def base_state(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(v, D_v per layer): what a node keeps between rounds (bounded: the adapted layers' size)."""
        return self.version, dict(self._base)

    def reset_base(self) -> None:
        """Back to W_0 at version 0 (another run on the same model)."""
        self.load_base(0, {})

    def load_base(self, version: int, base: dict[str, torch.Tensor]) -> None:
        """Put a kept base back (``base_state`` of an earlier process)."""
        self._base = {n: t.to(self._pristine[n].device) for n, t in base.items()}
        self.version = version
        self._folded = set(self.layer_names)  # write every layer once
        self.restore()

    @contextmanager
    def adapter(
        self, rank: int, scale: float, target_modules: list[str], init: dict[str, Factors] | None = None,
        train_A: bool = True, seed: int = 0, train_B: bool = True, dropout: float = 0.0, rank_pattern: dict[str, int] | None = None,
        adalora: AdaLoraSpec | None = None,
    ) -> Iterator[PeftModel]:
        """Attach a LoRA (rank r, lora_alpha = s·r) for the duration of the block, then remove it.

        ``rank_pattern`` gives some layers (full module paths) another rank, same scale s.
        A fresh adapter draws A with PEFT's own init under ``seed`` (B = 0); ``init`` overrides
        both factors. The base model comes back without LoRA layers; its weights are untouched.
        With ``adalora`` the layers are PEFT AdaLoRA layers (fresh only: no init, no rank_pattern).
        ``[all-linear]`` becomes this host's layers by their full names, as PEFT itself resolves it
        (so a saved adapter_config.json names concrete modules).
        """
        if ALL_LINEAR in target_modules:
            target_modules = list(self.layer_names)
        pattern = {f"^{re.escape(n)}": r for n, r in (rank_pattern or {}).items()}
        if adalora is not None:
            assert init is None and not pattern, "AdaLoRA adapters start fresh at one rank"
            config = AdaLoraConfig(
                init_r=rank, target_r=adalora.target_r, total_step=adalora.total_step, tinit=0, tfinal=adalora.tfinal,
                deltaT=1, lora_alpha=scale * rank, lora_dropout=dropout, target_modules=target_modules,
                orth_reg_weight=adalora.orth_reg_weight,
            )
        else:
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
            for layer in layers.values():
                _weight(layer.lora_A[ADAPTER]).requires_grad_(train_A)
                _weight(layer.lora_B[ADAPTER]).requires_grad_(train_B)
            yield peft_model
        finally:
            self.model = peft_model.unload()
            self.model.requires_grad_(False)  # also freezes a head made trainable inside the block

    @staticmethod
    def live_factors(peft_model: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The trainable (B, A) parameters by layer, for regularisers."""
        return {n: (_weight(m.lora_B[ADAPTER]), _weight(m.lora_A[ADAPTER])) for n, m in AdapterHost.lora_layers(peft_model).items()}

    @staticmethod
    def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
        """LoRA layers by base-model module path (PEFT's wrapper prefix stripped)."""
        inner = peft_model.base_model.model
        return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


def read_factors(layers: dict[str, LoraLayer], scale: float) -> dict[str, Factors]:
    """Detached float32 copies of every layer's (B, A) on the CPU, such that s·B·A is its delta.

    An AdaLoRA layer computes B (A ⊙ E) · α / (ranknum + 1e-5): its singular values E and that
    exact scale are folded into A (relative to s), and pruned components (E = 0) are dropped,
    so the rank read back is the layer's final local rank.
    """
    out = {}
    for name, layer in layers.items():
        B = _param(layer.lora_B[ADAPTER])
        A = _param(layer.lora_A[ADAPTER])
        if hasattr(layer, "lora_E"):
            E = layer.lora_E[ADAPTER].detach().to("cpu", torch.float64)  # (r × 1)
            ratio = float(layer.scaling[ADAPTER]) / (float(layer.ranknum[ADAPTER].detach()) + 1e-5) / scale
            keep = E[:, 0] != 0
            A = (A.double() * E * ratio)[keep].float()
            B = B[:, keep].clone()
        out[name] = Factors(B=B, A=A)
    return out


def _param(p: torch.Tensor | torch.nn.Module) -> torch.Tensor:
    return _weight(p).detach().to("cpu", torch.float32).clone()


def orthogonal_penalty(peft_model: PeftModel, weight: float) -> torch.Tensor:
    """AdaLoRA's regulariser, as PEFT adds it to a labelled forward: w · mean ‖PPᵀ − I‖_F over A and B."""
    terms = []
    for layer in AdapterHost.lora_layers(peft_model).values():
        A, B = _weight(layer.lora_A[ADAPTER]), _weight(layer.lora_B[ADAPTER])
        for cov in (A @ A.T, B.T @ B):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return weight * torch.stack(terms).mean()


def write_factors(layers: dict[str, LoraLayer], factors: dict[str, Factors]) -> None:
    with torch.no_grad():
        for name, layer in layers.items():
            f = factors[name]
            b, a = _weight(layer.lora_B[ADAPTER]), _weight(layer.lora_A[ADAPTER])
            assert b.shape == f.B.shape and a.shape == f.A.shape, f"{name}: factor shapes {tuple(f.B.shape)}, {tuple(f.A.shape)}"
            b.copy_(f.B)
            a.copy_(f.A)


def _weight(p: torch.Tensor | torch.nn.Module) -> torch.Tensor:
    """LoRA keeps factors in nn.Linear modules, AdaLoRA as bare parameters."""
    return p.weight if isinstance(p, torch.nn.Module) else p
