"""length_grouped_batches, collate and padding_fraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.data import IGNORE_INDEX, DataError, TokenizedExample, collate, length_grouped_batches, padding_fraction

BATCH = 8


def _random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def test_grouped_batches_cover_every_index_once() -> None:
    lengths = np.random.default_rng(0).integers(5, 300, size=1003).tolist()
    batches = length_grouped_batches(lengths, BATCH, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert all(1 <= len(b) <= BATCH for b in batches)
    assert sum(len(b) < BATCH for b in batches) <= 3  # only chunk tails are short
    assert batches == length_grouped_batches(lengths, BATCH, seed=0)
    assert batches != length_grouped_batches(lengths, BATCH, seed=1)


def test_grouped_batch_order_is_shuffled() -> None:
    lengths = list(range(4000))  # 500 batches in 10 length-sorted chunks
    maxima = [max(lengths[i] for i in b) for b in length_grouped_batches(lengths, BATCH, seed=0)]
    rises = sum(b > a for a, b in zip(maxima, maxima[1:])) / (len(maxima) - 1)
    assert 0.35 < rises < 0.65  # a random order rises about half the time; a sorted one never or always


def test_grouping_cuts_padding_on_chatterbot(chatterbot_tokenized: list[TokenizedExample]) -> None:
    lengths = [len(t.input_ids) for t in chatterbot_tokenized]
    grouped = padding_fraction([[lengths[i] for i in b] for b in length_grouped_batches(lengths, BATCH, seed=0)])
    shuffled = padding_fraction([[lengths[i] for i in b] for b in _random_batches(len(lengths), BATCH, seed=0)])
    assert grouped < shuffled / 3
    assert 0.0 <= grouped < 0.15 and shuffled > 0.2


def test_batch_size_validated() -> None:
    with pytest.raises(DataError, match=r"^train\.batch_size: invalid value 0"):
        length_grouped_batches([1, 2, 3], 0, seed=0)


def test_collate_pads_right_and_masks() -> None:
    examples = [
        TokenizedExample([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]),
        TokenizedExample([9, 10], [IGNORE_INDEX, 10]),
    ]
    batch = collate(examples, pad_id=0)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.labels.dtype == torch.long
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.labels.tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert (batch.real_tokens, batch.padded_tokens) == (6, 2)
    with pytest.raises(ValueError):
        collate([], pad_id=0)


def test_collate_real_data(chatterbot_tokenized: list[TokenizedExample], tokenizer: object) -> None:
    chunk = chatterbot_tokenized[:BATCH]
    batch = collate(chunk, pad_id=tokenizer.pad_token_id)  # type: ignore[attr-defined]
    assert batch.input_ids.shape == (BATCH, max(len(t.input_ids) for t in chunk))
    assert batch.real_tokens == sum(len(t.input_ids) for t in chunk)
    assert batch.real_tokens + batch.padded_tokens == batch.input_ids.numel()


def test_padding_fraction() -> None:
    assert padding_fraction([[4, 4], [2]]) == 0.0
    assert padding_fraction([[4, 2], [1, 3]]) == pytest.approx(1 - 10 / 14)
    assert padding_fraction([]) == 0.0
