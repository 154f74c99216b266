"""What a batch is and what the loss counts, per task; the training loop itself is task-blind.

- ``CausalLM``: next-token loss on answer tokens (labels −100 elsewhere), summed per token.
- ``Classification``: cross-entropy of a sequence-classification head, summed per example;
  evaluation adds accuracy and ``majority``, the split's most frequent label's share: the
  accuracy of always answering that label, the chance level to read accuracy against.
Both sum losses so micro-batches and splits of any size combine exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

from fedlora.data.batching import collate
from fedlora.train.loss import answer_loss_sum


class Task(Protocol):
    def collate(self, examples: Sequence[Any], pad_id: int) -> Any: ...

    def targets(self, example: Any) -> int:
        """How many loss terms one example contributes (answer tokens, or 1)."""
        ...

    def loss_sum(self, model: torch.nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]: ...

    def evaluate(self, model: torch.nn.Module, examples: Sequence[Any], batch_size: int, pad_id: int, device: torch.device) -> dict[str, float]: ...


class CausalLM:
    name = "causal_lm"

    def collate(self, examples: Sequence[Any], pad_id: int) -> Any:
        return collate(examples, pad_id)

    def targets(self, example: Any) -> int:
        return sum(1 for y in example.labels[1:] if y != -100)

    def loss_sum(self, model: torch.nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, int]:
        return answer_loss_sum(model, batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels)  # labels stay on the CPU

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: Sequence[Any], batch_size: int, pad_id: int, device: torch.device) -> dict[str, float]:
        total, count = _sum_over(self, model, examples, batch_size, pad_id, device)
        return {"loss": total / count if count else math.nan}


@dataclass
class LabelBatch:
    input_ids: torch.Tensor  # (b, L)
    attention_mask: torch.Tensor  # (b, L)
    labels: torch.Tensor  # (b,)
    real_tokens: int
    padded_tokens: int


class Classification:
    name = "classification"

    def collate(self, examples: Sequence[Any], pad_id: int) -> LabelBatch:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
            mask[row, : len(e.input_ids)] = 1
        labels = torch.tensor([int(e.label) for e in examples], dtype=torch.long)
        real = int(mask.sum())
        return LabelBatch(ids, mask, labels, real, ids.numel() - real)

    def targets(self, example: Any) -> int:
        return 1

    def loss_sum(self, model: torch.nn.Module, batch: LabelBatch, device: torch.device) -> tuple[torch.Tensor, int]:
        logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits  # (b, K)
        return F.cross_entropy(logits.float(), batch.labels.to(device), reduction="sum"), len(batch.labels)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: Sequence[Any], batch_size: int, pad_id: int, device: torch.device) -> dict[str, float]:
        if not examples:
            return {"loss": math.nan, "accuracy": math.nan, "majority": math.nan}
        total, correct = 0.0, 0
        was_training = model.training
        model.eval()
        for batch in _batches(self, examples, batch_size, pad_id):
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits.float()
            labels = batch.labels.to(device)
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        model.train(was_training)
        majority = Counter(int(e.label) for e in examples).most_common(1)[0][1]
        return {"loss": total / len(examples), "accuracy": correct / len(examples), "majority": majority / len(examples)}


def _batches(task: Task, examples: Sequence[Any], batch_size: int, pad_id: int):
    """Length-sorted evaluation batches: little padding, order irrelevant to a sum."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield task.collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def _sum_over(task: Task, model: torch.nn.Module, examples: Sequence[Any], batch_size: int, pad_id: int, device: torch.device) -> tuple[float, int]:
    total, count = torch.zeros((), dtype=torch.float64 if device.type != "mps" else torch.float32, device=device), 0
    was_training = model.training
    model.eval()
    for batch in _batches(task, examples, batch_size, pad_id):
        s, n = task.loss_sum(model, batch, device)
        total, count = total + s.detach(), count + n  # summed on the device: one sync for the split, not one per batch
    model.train(was_training)
    return float(total), count


TASKS: dict[str, type] = {"causal_lm": CausalLM, "classification": Classification}
