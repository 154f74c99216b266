"""partition (IID / Dirichlet label skew) and train_test_split."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from fedlora.data import DataError, Example, partition, train_test_split

# 12 categories x 40 examples: enough for Dirichlet skew to show clearly.
CATEGORIES = [f"c{i % 12}" for i in range(480)]


def _covers_once(parts: list[list[int]], n: int) -> bool:
    flat = [i for p in parts for i in p]
    return sorted(flat) == list(range(n))


def _mean_entropy(parts: list[list[int]], categories: list[str]) -> float:
    """Mean over clients of the entropy (nats) of the client's category distribution."""
    total = 0.0
    for part in parts:
        counts = Counter(categories[i] for i in part)
        total -= sum(c / len(part) * math.log(c / len(part)) for c in counts.values())
    return total / len(parts)


def test_iid_near_equal_sorted_and_complete() -> None:
    parts = partition(CATEGORIES[:103], 10, "iid", seed=3)
    assert _covers_once(parts, 103)
    assert {len(p) for p in parts} == {10, 11}
    assert all(p == sorted(p) for p in parts)
    assert parts == partition(CATEGORIES[:103], 10, "iid", seed=3)
    assert parts != partition(CATEGORIES[:103], 10, "iid", seed=4)
    assert parts[0] != list(range(11))  # shuffled, not contiguous


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    skewed = [_mean_entropy(partition(CATEGORIES, 8, "dirichlet", alpha=0.1, seed=s), CATEGORIES) for s in range(3)]
    uniform = [_mean_entropy(partition(CATEGORIES, 8, "dirichlet", alpha=100.0, seed=s), CATEGORIES) for s in range(3)]
    assert sum(skewed) / 3 < sum(uniform) / 3 - 0.5
    assert min(uniform) > 0.9 * math.log(12)  # alpha=100 is close to IID


def test_dirichlet_reproducible_distinct_complete_and_min_size() -> None:
    parts = partition(CATEGORIES, 10, "dirichlet", alpha=0.1, seed=7, min_size=5)
    assert parts == partition(CATEGORIES, 10, "dirichlet", alpha=0.1, seed=7, min_size=5)
    assert parts != partition(CATEGORIES, 10, "dirichlet", alpha=0.1, seed=8, min_size=5)
    assert _covers_once(parts, len(CATEGORIES))
    assert min(len(p) for p in parts) >= 5
    assert all(p == sorted(p) for p in parts)


def test_dirichlet_on_chatterbot_topics(chatterbot_examples: list[Example]) -> None:
    categories = [e.category for e in chatterbot_examples]
    parts = partition(categories, 10, "dirichlet", alpha=0.5, seed=0)
    assert _covers_once(parts, len(categories)) and min(len(p) for p in parts) >= 2


def test_unknown_scheme() -> None:
    with pytest.raises(DataError, match=r"^data\.partition: unknown value 'pathological' \(accepted: iid, dirichlet\)$"):
        partition(CATEGORIES, 4, "pathological")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_too_many_clients(scheme: str) -> None:
    with pytest.raises(DataError, match=r"^federation\.num_clients: 6 clients x 2 examples .* data has 11"):
        partition(CATEGORIES[:11], 6, scheme)
    with pytest.raises(DataError, match=r"^federation\.num_clients: invalid value 0"):
        partition(CATEGORIES, 0, scheme)


def test_dirichlet_impossible_min_size_and_bad_alpha() -> None:
    # One category, vanishing alpha: all mass on one client every draw, so min_size can never be met.
    with pytest.raises(DataError, match=r"^federation\.num_clients: 4 clients could not each get >= 2 .*data\.alpha"):
        partition(["x"] * 100, 4, "dirichlet", alpha=1e-4, seed=0)
    with pytest.raises(DataError, match=r"^data\.alpha: invalid value 0"):
        partition(CATEGORIES, 4, "dirichlet", alpha=0)


def test_train_test_split() -> None:
    indices = list(range(100, 150))
    train, test = train_test_split(indices, 0.2, seed=1)
    assert len(test) == 10 and sorted(train + test) == indices
    assert train == sorted(train) and test == sorted(test)
    assert (train, test) == train_test_split(indices, 0.2, seed=1)
    assert test != train_test_split(indices, 0.2, seed=2)[1]
    assert train_test_split([5, 9], 0.01, seed=0)[1] in ([5], [9])  # at least one test example
    assert train_test_split([5, 9, 11], 0.99, seed=0)[0] != []  # at least one train example
    assert train_test_split(indices, 0.0, seed=0) == (indices, [])
    assert train_test_split([3], 0.5, seed=0) == ([3], [])
    with pytest.raises(DataError, match=r"^data\.test_fraction: invalid value 1\.5"):
        train_test_split(indices, 1.5, seed=0)
