"""The packaged per-task configs validate against their model and deal their corpus as their comments say (no weights loaded)."""

from __future__ import annotations

from collections import Counter

import pytest

from fedlora.config import load_config, packaged_config
from fedlora.data import DataError
from fedlora.federation.experiment import check_model, load_source, split_indices


def _split(name: str) -> tuple[list, dict]:
    cfg = load_config(packaged_config(name))
    try:
        check_model(cfg)  # model folder, target layers, every rank fits
        examples = load_source(cfg)
    except DataError as exc:  # the corpus package is not installed
        pytest.skip(str(exc))
    return examples, split_indices(cfg, [e.category for e in examples])


def _dealt(info: dict) -> list[int]:
    return sorted(i for c in info["clients"] for i in c["train_indices"] + c["test_indices"]) + info["global_test_indices"]


def test_classification_clients_hold_both_labels() -> None:
    """Dirichlet over the movie skews which films a client sees, not the fresh/rotten mix."""
    examples, info = _split("classification")
    assert len(info["clients"]) == 10
    for c in info["clients"]:
        labels = Counter(examples[i].response for i in c["train_indices"])
        assert set(labels) == {"fresh", "rotten"} and min(labels.values()) >= 0.3 * sum(labels.values())


def test_news_gives_each_outlet_its_own_client() -> None:
    examples, info = _split("news")
    outlets = [set(c["categories"]) for c in info["clients"]]
    assert len(outlets) == 9 and all(len(o) == 1 for o in outlets) and len(set.union(*outlets)) == 9
    assert {examples[0].kind} == {e.kind for e in examples} == {"text"}
    dealt = _dealt(info)
    assert len(dealt) == len(set(dealt))


def test_healthtweets_labels_are_the_16_accounts() -> None:
    examples, info = _split("healthtweets")
    assert len({e.response for e in examples}) == 16 and all(e.kind == "label" for e in examples)
    assert len(info["clients"]) == 8 and all(c["train"] > 0 for c in info["clients"])
