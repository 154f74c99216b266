"""AdaLoRA as the local adapter (``lora.adapter: adalora``): a trainer variant, nothing else changes.

Each client trains PEFT AdaLoRA layers at its rank r_k, which prune their singular components
towards ⌈target·r_k⌉ on average within the local steps (importance scores updated after every
optimizer step, an orthogonality penalty on P and Q). The factors read back fold the kept
singular values into A, so the upload is an ordinary LoRA pair at a lower rank; the server accepts
the lower rank (``shrinks_rank``) and aggregates it as the method does any other (FLoRA).
"""

from __future__ import annotations

import math

import torch

from fedlora.methods.base import ClientPlan
from fedlora.model.adapters import AdaLoraSpec, orthogonal_penalty
from fedlora.train.local import LocalTrainer


class AdaLoraTrainer(LocalTrainer):
    shrinks_rank = True

    def __init__(self, *args, target: float = 0.5, orth_reg: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.target, self.orth_reg = target, orth_reg

    def adapter_spec(self, plan: ClientPlan) -> AdaLoraSpec:
        """Prune the plan's rank r towards ⌈target·r⌉ on average within the local steps."""
        target_r = max(1, math.ceil(self.target * plan.rank))
        return AdaLoraSpec(target_r=target_r, total_step=self.cfg.local_steps, tfinal=1, orth_reg_weight=self.orth_reg)

    def extra_penalty(self, peft_model: torch.nn.Module) -> torch.Tensor:
        return orthogonal_penalty(peft_model, self.orth_reg)

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        model.base_model.update_and_allocate(step)  # importance scores need this step's gradients
