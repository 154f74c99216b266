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


def normalised(weights: Sequence[float]) -> list[float]:
    """w_k / Σ w (uniform when every weight is 0): a method's weights never scale its aggregate."""
    assert weights and all(w >= 0 for w in weights), f"weights must be non-negative, got {list(weights)}"
    total = float(sum(weights))
    return [float(w) / total for w in weights] if total > 0 else [1.0 / len(weights)] * len(weights)


def uniform_weights(count: int) -> list[float]:
    assert count > 0, "no clients"
    return [1.0 / count] * count
