"""Split examples across federated clients (IID or Dirichlet label skew) and into train/test.

The Dirichlet split is the standard non-IID benchmark of the FL literature (Hsu et al. 2019):
smaller `alpha` concentrates each category on fewer clients, so client data distributions
diverge. Everything is driven by one seeded numpy generator so a split is reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fedlora.data import DataError

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet")
MAX_DRAWS = 1000  # Dirichlet redraws before giving up on the min_size constraint


def partition(
    categories: Sequence[str], num_clients: int, scheme: str, *, alpha: float = 0.5, seed: int = 0, min_size: int = 2
) -> list[list[int]]:
    """Client `c` gets the sorted example indices `result[c]`; every index lands in exactly one client."""
    if scheme not in SCHEMES:
        raise DataError(f"data.partition: unknown value {scheme!r} (accepted: {', '.join(SCHEMES)})")
    if not isinstance(num_clients, int) or num_clients < 1:
        raise DataError(f"federation.num_clients: invalid value {num_clients!r} (accepted: an integer >= 1)")
    n = len(categories)
    if n < num_clients * min_size:
        raise DataError(
            f"federation.num_clients: {num_clients} clients x {min_size} examples each needs {num_clients * min_size} "
            f"examples but the data has {n} (accepted: num_clients <= {n // max(min_size, 1)})"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    else:
        if not alpha > 0:
            raise DataError(f"data.alpha: invalid value {alpha!r} (accepted: a number > 0)")
        parts = _dirichlet(categories, num_clients, alpha, min_size, rng)
    return [sorted(int(i) for i in part) for part in parts]


def _dirichlet(
    categories: Sequence[str], num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per category, deal its shuffled indices to clients in Dir(alpha·1) proportions; redraw until all clients fit."""
    labels = np.asarray(categories, dtype=object)
    groups = [np.flatnonzero(labels == c) for c in sorted(set(categories))]
    for draw in range(1, MAX_DRAWS + 1):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in groups:
            shuffled = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(int)
            for client, chunk in enumerate(np.split(shuffled, cuts)):
                buckets[client].append(chunk)
        parts = [np.concatenate(b) if b else np.empty(0, dtype=int) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            if draw > 1:
                log.debug("Dirichlet split needed %d draws to give every client >= %d examples", draw, min_size)
            return parts
    raise DataError(
        f"federation.num_clients: {num_clients} clients could not each get >= {min_size} examples in {MAX_DRAWS} "
        f"Dirichlet draws with data.alpha={alpha} (accepted: fewer clients or a larger alpha)"
    )


def train_test_split(indices: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of `indices` into sorted (train, test); test has >= 1 example when possible and fraction > 0."""
    if not 0 <= test_fraction < 1:
        raise DataError(f"data.test_fraction: invalid value {test_fraction!r} (accepted: 0 <= fraction < 1)")
    values = [int(i) for i in indices]
    n = len(values)
    n_test = round(n * test_fraction)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    test = sorted(values[i] for i in order[:n_test])
    train = sorted(values[i] for i in order[n_test:])
    return train, test
