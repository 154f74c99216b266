"""partition under every scheme (iid, dirichlet, pathological, natural, quantity) and train_test_split."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from fedlora.data import SCHEMES, DataError, Example, partition, train_test_split

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
    with pytest.raises(
        DataError, match=r"^data\.partition: unknown value 'shards' \(accepted: iid, dirichlet, pathological, natural, quantity\)$"
    ):
        partition(CATEGORIES, 4, "shards")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "quantity"])
def test_too_many_clients(scheme: str) -> None:
    with pytest.raises(DataError, match=r"^federation\.num_clients: 6 clients x 2 examples .* but 11 are left to partition \(accepted: federation.num_clients <= 5, "):
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


# --- every scheme -------------------------------------------------------------------------------

# 10 clients for all schemes but natural, which needs one client per category (12).
OPTIONS = {"alpha": 0.5, "classes_per_client": 3}


def _clients(scheme: str) -> int:
    return 12 if scheme == "natural" else 10


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_disjoint_complete_sorted_and_reproducible(scheme: str) -> None:
    parts = partition(CATEGORIES, _clients(scheme), scheme, seed=5, **OPTIONS)
    assert len(parts) == _clients(scheme)
    assert _covers_once(parts, len(CATEGORIES))  # disjoint and covering every index
    assert all(p == sorted(p) and len(p) >= 2 for p in parts)
    assert parts == partition(CATEGORIES, _clients(scheme), scheme, seed=5, **OPTIONS)
    other = partition(CATEGORIES, _clients(scheme), scheme, seed=6, **OPTIONS)
    if scheme == "natural":
        assert other == parts  # the data decides, not the seed
    else:
        assert other != parts


def test_pathological_gives_exactly_k_categories_per_client() -> None:
    for k in (1, 2, 5):
        parts = partition(CATEGORIES, 12, "pathological", classes_per_client=k, seed=0)
        assert [len({CATEGORIES[i] for i in p}) for p in parts] == [k] * 12
        assert _covers_once(parts, len(CATEGORIES))
    # 10 clients x 2 categories reach all 12 categories (a window starting at client c would reach only 11).
    parts = partition(CATEGORIES, 10, "pathological", classes_per_client=2, seed=0)
    assert [len({CATEGORIES[i] for i in p}) for p in parts] == [2] * 10 and _covers_once(parts, len(CATEGORIES))
    held = [sorted({CATEGORIES[i] for i in p}) for p in parts]
    assert held != [sorted({CATEGORIES[i] for i in p}) for p in partition(CATEGORIES, 10, "pathological", classes_per_client=2, seed=1)]


def test_pathological_errors_name_their_settings() -> None:
    with pytest.raises(DataError, match=r"^data\.classes_per_client: 2 categories for each of federation\.num_clients=5 clients cannot cover all 12 categories \(accepted: data\.classes_per_client >= 3"):
        partition(CATEGORIES, 5, "pathological", classes_per_client=2)
    with pytest.raises(DataError, match=r"^data\.classes_per_client: invalid value 13 \(accepted: an integer from 1 to 12"):
        partition(CATEGORIES, 5, "pathological", classes_per_client=13)
    with pytest.raises(DataError, match=r"^data\.classes_per_client: invalid value 0"):
        partition(CATEGORIES, 5, "pathological", classes_per_client=0)
    rare = ["a"] * 50 + ["b"] * 2  # 'b' would be shared by 4 clients
    with pytest.raises(DataError, match=r"^data\.classes_per_client: category 'b' has 2 examples but 4 clients hold it"):
        partition(rare, 4, "pathological", classes_per_client=2)


def test_natural_gives_one_category_per_client_in_name_order() -> None:
    parts = partition(CATEGORIES, 12, "natural")
    assert [{CATEGORIES[i] for i in p} for p in parts] == [{c} for c in sorted(set(CATEGORIES))]
    with pytest.raises(
        DataError,
        match=r"^federation\.num_clients: data\.partition=natural makes one client per distinct category value and the data has 12, "
        r"but federation\.num_clients=10 \(accepted: 12\)$",
    ):
        partition(CATEGORIES, 10, "natural")
    with pytest.raises(DataError, match=r"^data\.min_size: data\.partition=natural gives client 1 only 1 examples, fewer than data\.min_size=2"):
        partition(["a"] * 5 + ["b"], 2, "natural")


def test_quantity_skews_sizes_not_content() -> None:
    big = [f"c{i % 12}" for i in range(6000)]

    def spread(alpha: float, seed: int) -> float:
        sizes = [len(p) for p in partition(big, 10, "quantity", alpha=alpha, seed=seed)]
        return max(sizes) / min(sizes)

    assert min(spread(0.1, s) for s in range(3)) > 20  # a few clients hold most of the data
    assert max(spread(100.0, s) for s in range(3)) < 1.6  # near-equal
    parts = partition(big, 10, "quantity", alpha=0.5, seed=0, min_size=5)
    assert min(len(p) for p in parts) >= 5 and _covers_once(parts, len(big))
    largest = max(parts, key=len)
    shares = Counter(big[i] for i in largest)
    assert max(shares.values()) / min(shares.values()) < 1.5  # the content stays IID


def test_quantity_and_settings_errors() -> None:
    with pytest.raises(DataError, match=r"^data\.alpha: invalid value -1"):
        partition(CATEGORIES, 4, "quantity", alpha=-1)
    with pytest.raises(DataError, match=r"^data\.min_size: invalid value 0 \(accepted: an integer >= 1\)$"):
        partition(CATEGORIES, 4, "iid", min_size=0)
    with pytest.raises(DataError, match=r"^federation\.num_clients: 10 clients x 50 examples .*a smaller data\.min_size, or more data\)$"):
        partition(CATEGORIES, 10, "quantity", min_size=50)
    with pytest.raises(DataError, match=r"^data\.min_size: data\.partition=pathological gives client \d only 10 examples, fewer than data\.min_size=20"):
        partition(["a"] * 100 + ["b"] * 100 + ["c"] * 10, 3, "pathological", classes_per_client=1, min_size=20, seed=0)


def test_missing_flwr_datasets_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # makes the import fail
    with pytest.raises(DataError, match=r"^data\.partition: 'dirichlet' needs the package 'flwr-datasets'.*`pip install flwr-datasets==0\.6\.1`"):
        partition(CATEGORIES, 4, "dirichlet")
    assert _covers_once(partition(CATEGORIES, 4, "pathological", classes_per_client=3), len(CATEGORIES))  # needs no flwr
