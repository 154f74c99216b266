"""Batch tokenized examples with little padding while keeping the batch order random.

Chat answers vary from a few tokens to hundreds; random batches would spend most compute on
padding. Grouping by length inside large shuffled chunks (the usual "group by length"
sampler) removes most of it without a fixed short-to-long curriculum.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedlora.data import DataError
from fedlora.data.formatting import IGNORE_INDEX, TokenizedExample

MEGA_BATCHES = 50  # a length-sorted chunk spans this many batches


@dataclass
class Batch:
    """One right-padded training batch and its padding bookkeeping."""

    input_ids: torch.Tensor  # (b, L) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (b, L) long
    labels: torch.Tensor  # (b, L) long, IGNORE_INDEX on padding and prompt
    real_tokens: int  # sum of attention_mask
    padded_tokens: int  # b*L - real_tokens


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Index batches of similar length in random order; every index appears exactly once."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"train.batch_size: invalid value {batch_size!r} (accepted: an integer >= 1)")
    rng = np.random.default_rng(seed)
    sizes = np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(len(sizes))
    chunk = MEGA_BATCHES * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        members = order[start : start + chunk]
        members = members[np.argsort(-sizes[members], kind="stable")]
        batches.extend([int(i) for i in members[b : b + batch_size]] for b in range(0, len(members), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    real = int(attention_mask.sum())
    return Batch(input_ids, attention_mask, labels, real_tokens=real, padded_tokens=input_ids.numel() - real)


def padding_fraction(batches_of_lengths: Iterable[Sequence[int]]) -> float:
    """Share of padded positions when each batch is padded to its longest member."""
    real = padded_total = 0
    for batch in batches_of_lengths:
        if len(batch):
            real += sum(batch)
            padded_total += len(batch) * max(batch)
    return 1.0 - real / padded_total if padded_total else 0.0
