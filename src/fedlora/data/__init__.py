"""Data layer: load instruction examples, tokenize them, split them across clients, batch them."""

from __future__ import annotations


class DataError(ValueError):
    """Bad user input to the data layer; the message names the config setting, the value and what is accepted."""


# Imported after DataError: the submodules import it from here.
from fedlora.data.batching import Batch, collate, length_grouped_batches, padding_fraction  # noqa: E402
from fedlora.data.formatting import IGNORE_INDEX, TokenizedExample, tokenize_examples  # noqa: E402
from fedlora.data.partition import partition, train_test_split  # noqa: E402
from fedlora.data.sources import Example, load_examples  # noqa: E402

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "DataError",
    "Example",
    "TokenizedExample",
    "collate",
    "length_grouped_batches",
    "load_examples",
    "padding_fraction",
    "partition",
    "tokenize_examples",
    "train_test_split",
]
