"""Held-out loss on answer tokens, batched by length so little compute goes to padding."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fedlora.data.batching import collate
from fedlora.data.formatting import TokenizedExample
from fedlora.train.loss import answer_loss_sum


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, examples: Sequence[TokenizedExample], batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean next-token loss per answer token (nats); NaN for an empty split."""
    if not examples:
        return math.nan
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        b = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        s, n = answer_loss_sum(model, b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device))
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / count if count else math.nan
