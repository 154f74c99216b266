"""Aggregation weights over the clients sampled in a round."""

from __future__ import annotations

from typing import Sequence


def data_weights(num_examples: Sequence[int]) -> list[float]:
    """p_k = n_k / Σ_{j∈S_t} n_j (methods.md §0); uniform if every n_k is 0."""
    assert num_examples, "no clients"
    assert all(n >= 0 for n in num_examples), f"negative example count in {list(num_examples)}"
    total = sum(num_examples)
    if total == 0:
        return [1.0 / len(num_examples)] * len(num_examples)
    return [n / total for n in num_examples]


def uniform_weights(count: int) -> list[float]:
    assert count > 0, "no clients"
    return [1.0 / count] * count
