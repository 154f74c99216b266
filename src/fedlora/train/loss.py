"""Next-token loss on answer tokens only, summed so batches of any size combine exactly.

Only the positions that predict an answer token go through the LM head (transformers'
``logits_to_keep`` with a boolean mask): with a 49k vocabulary and answers a third of each
example, that skips most of the head's compute and the (b × L × V) logits tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ cross-entropy over positions whose next token is an answer token, and their count.

    input_ids, attention_mask, labels: (b, L); labels are −100 on prompt and padding. Labels on the
    CPU (as collated) keep the count off the accelerator: no device sync per micro-batch.
    """
    targets = labels[:, 1:]  # (b, L−1): the token each position predicts
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != -100  # (b, L)
    count = int(keep.sum())
    device = input_ids.device
    keep, targets = keep.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax in full precision
    if logits.dim() == 2:  # (count × V): only the kept positions
        loss = F.cross_entropy(logits, targets[keep[:, :-1]], reduction="sum")
    else:  # a model that ignores boolean logits_to_keep: full (b × L × V) logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, count
