"""Held-out loss on answer tokens (the causal-LM task's evaluation, kept as a plain function)."""

from __future__ import annotations

from typing import Sequence

import torch

from fedlora.data.formatting import TokenizedExample
from fedlora.train.tasks import CausalLM


def heldout_loss(model: torch.nn.Module, examples: Sequence[TokenizedExample], batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean next-token loss per answer token (nats); NaN for an empty split."""
    return CausalLM().evaluate(model, examples, batch_size, pad_id, device)["loss"]
