"""Split examples across federated clients under the usual FL data-skew schemes, and into train/test.

| scheme        | what differs between clients                                       | implementation            |
|---------------|--------------------------------------------------------------------|---------------------------|
| iid           | nothing: a seeded shuffle cut into near-equal shards               | flwr-datasets IidPartitioner |
| dirichlet     | category mix: per category, Dir(alpha) proportions over clients (Hsu et al. 2019) | flwr-datasets DirichletPartitioner |
| pathological  | each client holds exactly `classes_per_client` categories (McMahan et al. 2017) | here (see `_pathological`) |
| natural       | one client per distinct category value (a topic, an outlet, an account) | flwr-datasets NaturalIdPartitioner |
| quantity      | sizes: Dir(alpha) over clients, content IID (Li et al. 2022)       | flwr-datasets SizePartitioner |

Every scheme is a pure function of (categories, num_clients, options, seed): the result is
reproducible, disjoint, covers every index and gives each client >= `min_size` examples. The
flwr-datasets partitioners get a `datasets.Dataset` of (idx, category) rows whose order is a
seeded permutation, so their contiguous shards are random samples.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedlora.data import DataError

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "pathological", "natural", "quantity")
MAX_DRAWS = 100  # seeds tried for a Dirichlet split that gives every client >= min_size (each seed tries 11 draws)
FLWR_DATASETS = "flwr-datasets==0.6.1"


def partition(
    categories: Sequence[str],
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 2,
    classes_per_client: int = 2,
) -> list[list[int]]:
    """Client `c` gets the sorted example indices `result[c]`; every index lands in exactly one client."""
    if scheme not in SCHEMES:
        raise DataError(f"data.partition: unknown value {scheme!r} (accepted: {', '.join(SCHEMES)})")
    if not isinstance(num_clients, int) or num_clients < 1:
        raise DataError(f"federation.num_clients: invalid value {num_clients!r} (accepted: an integer >= 1)")
    if not isinstance(min_size, int) or min_size < 1:
        raise DataError(f"data.min_size: invalid value {min_size!r} (accepted: an integer >= 1)")
    if scheme in ("dirichlet", "quantity") and not alpha > 0:
        raise DataError(f"data.alpha: invalid value {alpha!r} (accepted: a number > 0)")
    n = len(categories)
    if n < num_clients * min_size:
        fits = f"federation.num_clients <= {n // min_size}, " if n // min_size >= 1 else ""
        raise DataError(
            f"federation.num_clients: {num_clients} clients x {min_size} examples each need {num_clients * min_size} "
            f"examples but {n} are left to partition (accepted: {fits}a smaller data.min_size, or more data)"
        )
    labels = [str(c) for c in categories]
    rng = np.random.default_rng(seed)
    if scheme == "pathological":
        parts = _pathological(labels, num_clients, classes_per_client, rng)
    else:
        make = _flwr_partitioner(scheme, labels, num_clients, alpha, min_size, seed, rng)
        parts = _run(make, labels, rng, num_clients, alpha, min_size, seed)
    small = [(client, len(part)) for client, part in enumerate(parts) if len(part) < min_size]
    if small:
        client, size = small[0]
        raise DataError(
            f"data.min_size: data.partition={scheme} gives client {client} only {size} examples, fewer than "
            f"data.min_size={min_size} (accepted: a smaller data.min_size or another partition)"
        )
    return [sorted(int(i) for i in part) for part in parts]


# --- flwr-datasets ------------------------------------------------------------------------------


def _flwr_partitioner(
    scheme: str, labels: list[str], num_clients: int, alpha: float, min_size: int, seed: int, rng: np.random.Generator
) -> Callable[[int], Any]:
    """A factory: attempt number -> a fresh flwr-datasets partitioner (only Dirichlet uses the attempt, as a new seed)."""
    try:
        from flwr_datasets import partitioner as fp
    except ImportError:
        raise DataError(
            f"data.partition: {scheme!r} needs the package 'flwr-datasets', which is not installed (run `pip install {FLWR_DATASETS}`)"
        ) from None
    if scheme == "iid":
        return lambda attempt: fp.IidPartitioner(num_partitions=num_clients)
    if scheme == "dirichlet":
        return lambda attempt: fp.DirichletPartitioner(
            num_partitions=num_clients, partition_by="category", alpha=float(alpha), min_partition_size=min_size,
            self_balancing=False, shuffle=False, seed=int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0]),
        )
    if scheme == "natural":
        values = len(set(labels))
        if values != num_clients:
            raise DataError(
                f"federation.num_clients: data.partition=natural makes one client per distinct category value and the "
                f"data has {values}, but federation.num_clients={num_clients} (accepted: {values})"
            )
        return lambda attempt: fp.NaturalIdPartitioner(partition_by="category")
    sizes = _quantity_sizes(len(labels), num_clients, alpha, min_size, rng)
    return lambda attempt: fp.SizePartitioner(partition_sizes=sizes)


def _run(
    make: Callable[[int], Any], labels: list[str], rng: np.random.Generator, num_clients: int, alpha: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Feed (idx, category) rows in a seeded random order to the partitioner, read back each client's idx."""
    from datasets import Dataset

    order = rng.permutation(len(labels))
    table = Dataset.from_dict({"idx": order, "category": [labels[i] for i in order]})
    for attempt in range(MAX_DRAWS):  # Dirichlet: a new seed when 11 draws could not meet min_size
        try:
            return _load(make(attempt), table, num_clients)
        except ValueError as exc:
            if "max number of attempts" not in str(exc):
                raise
    raise DataError(
        f"federation.num_clients: {num_clients} clients could not each get >= {min_size} examples in {MAX_DRAWS * 11} "
        f"Dirichlet draws with data.alpha={alpha} (accepted: fewer clients, a larger data.alpha or a smaller data.min_size)"
    )


def _load(partitioner: Any, table: Any, num_clients: int) -> list[np.ndarray]:
    partitioner.dataset = table
    # flwr-datasets warns on every Dirichlet redraw and draws a tqdm bar for natural ids: keep both out of the output.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return [np.asarray(partitioner.load_partition(c)["idx"][:], dtype=np.int64) for c in range(num_clients)]


def _quantity_sizes(n: int, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator) -> list[int]:
    """min_size each, plus the rest dealt in Dir(alpha) proportions (largest remainders round), summing to n."""
    share = rng.dirichlet(np.full(num_clients, float(alpha))) * (n - num_clients * min_size)
    sizes = np.floor(share).astype(np.int64)
    rest = int(n - num_clients * min_size - sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:rest]] += 1
    return [int(s) + min_size for s in sizes]


# --- pathological -------------------------------------------------------------------------------


def _pathological(labels: list[str], num_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Exactly k categories per client; each category's shuffled examples split evenly among its holders.

    The categories are put in a seeded random cyclic order and client c takes the k consecutive ones
    starting at c*k, so all K categories are used as soon as num_clients*k >= K. (flwr-datasets'
    PathologicalPartitioner starts client c at c, reaching only num_clients+k-1 categories, and its
    random modes drop the examples of categories no client drew.)
    """
    counts = Counter(labels)
    names = sorted(counts)
    if not isinstance(k, int) or not 1 <= k <= len(names):
        raise DataError(f"data.classes_per_client: invalid value {k!r} (accepted: an integer from 1 to {len(names)}, the number of categories)")
    if num_clients * k < len(names):
        raise DataError(
            f"data.classes_per_client: {k} categories for each of federation.num_clients={num_clients} clients cannot cover "
            f"all {len(names)} categories (accepted: data.classes_per_client >= {-(-len(names) // num_clients)} or more clients)"
        )
    cycle = [names[i] for i in rng.permutation(len(names))]
    held = [[cycle[(c * k + j) % len(cycle)] for j in range(k)] for c in range(num_clients)]
    holders: dict[str, list[int]] = {name: [] for name in names}
    for client, chosen in enumerate(held):
        for name in chosen:
            holders[name].append(client)
    short = [name for name in names if counts[name] < len(holders[name])]
    if short:
        raise DataError(
            f"data.classes_per_client: category {short[0]!r} has {counts[short[0]]} examples but {len(holders[short[0]])} "
            f"clients hold it (accepted: a smaller data.classes_per_client or fewer federation.num_clients)"
        )
    array = np.asarray(labels, dtype=object)
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for name in names:
        members = rng.permutation(np.flatnonzero(array == name))
        for client, chunk in zip(holders[name], np.array_split(members, len(holders[name]))):
            buckets[client].append(chunk)
    return [np.concatenate(b) for b in buckets]


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
