"""Aggregation weights over the clients sampled in a round."""

from __future__ import annotations

from dataclasses import dataclass
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


POLICIES = ("data", "uniform", "capped")


@dataclass(frozen=True)
class Weighting:
    """How client k's example count n_k becomes its weight w_k: written once, for every method that weighs clients.

    - ``data``: n_k (FedAvg's p_k = n_k / Σ n once normalised);
    - ``uniform``: 1 (every client counts the same);
    - ``capped``: min(n_k, cap), so that no client weighs more than ``cap`` examples' worth: the bounded
      weights of DP-FedAvg (McMahan et al., ICLR 2018), and a guard against one client's inflated count.
    """

    policy: str = "data"
    cap: float = 0.0

    def weigh(self, count: float) -> float:
        if self.policy == "uniform":
            return 1.0
        return min(float(count), self.cap) if self.policy == "capped" else float(count)

    def applied(self, counts: Sequence[float]) -> list[float]:
        """The round's weights as applied, normalised to sum 1 (uniform when every weight is 0)."""
        return normalised([self.weigh(c) for c in counts])
