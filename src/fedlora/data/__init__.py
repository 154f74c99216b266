"""Data layer: load examples (built-in corpora or local files), tokenize them, split them across clients, batch them."""

from __future__ import annotations


class DataError(ValueError):
    """Bad user input to the data layer; the message names the config setting, the value and what is accepted."""


# Imported after DataError: the submodules import it from here.
from fedlora.data.batching import Batch, collate, length_grouped_batches, padding_fraction  # noqa: E402
from fedlora.data.example import KINDS, Example  # noqa: E402
from fedlora.data.formatting import (  # noqa: E402
    IGNORE_INDEX,
    ClassifiedExample,
    TokenizedExample,
    TokenizeStats,
    label_names_of,
    tokenize_examples,
    tokenize_for_classification,
)
from fedlora.data.partition import SCHEMES, partition, train_test_split  # noqa: E402
from fedlora.data.sources import BUILTIN, load_examples  # noqa: E402

__all__ = [
    "BUILTIN",
    "IGNORE_INDEX",
    "KINDS",
    "SCHEMES",
    "Batch",
    "ClassifiedExample",
    "DataError",
    "Example",
    "TokenizeStats",
    "TokenizedExample",
    "collate",
    "label_names_of",
    "length_grouped_batches",
    "load_examples",
    "padding_fraction",
    "partition",
    "tokenize_examples",
    "tokenize_for_classification",
    "train_test_split",
]
