"""Where examples come from: a built-in corpus by name, or a local file / save_to_disk folder.

Every source is reduced to the same `Example` (prompt, response, category, kind) so the rest of
the pipeline never cares about the original schema; `category` is kept because it is what the
non-IID partitions skew over (`data.by`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedlora.data import DataError
from fedlora.data.corpora import CORPORA
from fedlora.data.example import Example
from fedlora.data.records import ACCEPTED_FIELDS, FILE_TYPES, load_file

log = logging.getLogger(__name__)

CHATTERBOT = "chatterbot"
BUILTIN = tuple(CORPORA)
ACCEPTED_SOURCES = f"accepted: {', '.join(repr(name) for name in BUILTIN)}, or {FILE_TYPES}"

__all__ = ["ACCEPTED_FIELDS", "ACCEPTED_SOURCES", "BUILTIN", "Example", "load_examples"]


def load_examples(
    source: str,
    *,
    language: str = "english",
    max_examples: int | None = None,
    seed: int = 0,
    by: str = "category",
    text_field: str | None = None,
    label_field: str | None = None,
) -> list[Example]:
    """Load `source` in a deterministic order, optionally keeping a seeded random subset (in source order).

    `by` names the grouping that becomes `Example.category` ("category" = the source's natural one);
    `text_field` / `label_field` name the text and label columns of files that use other names.
    `language` applies to chatterbot only.
    """
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise DataError(f"data.max_examples: invalid value {max_examples!r} (accepted: a positive integer or null)")
    if source in CORPORA:
        for setting, value in (("data.text_field", text_field), ("data.label_field", label_field)):
            if value is not None:
                raise DataError(f"{setting}: only applies to local files, not the built-in corpus {source!r} (accepted: null)")
        examples = CORPORA[source](by, language)
    elif Path(source).expanduser().exists():
        examples = load_file(source, by=by, text_field=text_field, label_field=label_field)
    else:
        raise DataError(f"data.source: file not found: {Path(source).expanduser()} ({ACCEPTED_SOURCES})")
    if max_examples is not None and max_examples < len(examples):
        keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=max_examples, replace=False))
        examples = [examples[i] for i in keep]
    log.info("Loaded %d examples in %d categories from %s", len(examples), len({e.category for e in examples}), source)
    return examples
