"""Next-token loss on answer tokens only, summed so batches of any size combine exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ of cross-entropy over positions whose next-token label is not −100, and their count.

    logits: (b, L, V); labels: (b, L), −100 on prompt and padding.
    """
    shift_logits = logits[:, :-1].float()  # (b, L−1, V)
    shift_labels = labels[:, 1:]  # (b, L−1)
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((shift_labels != -100).sum())
