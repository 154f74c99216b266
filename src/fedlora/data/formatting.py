"""Turn examples into token ids with the model's own chat template and answer-only labels.

Training on the template the model was instruction-tuned with keeps fine-tuning in its
native format; masking the prompt (-100) means the loss measures only how well the model
answers, and keeping the closing end-of-turn token in the labels teaches it to stop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.data import DataError
from fedlora.data.sources import Example

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
PLAIN_PREFIX = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass(frozen=True)
class TokenizedExample:
    """Model input and its labels, aligned token by token."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt (and template) tokens, token ids on the answer tokens


def tokenize_examples(examples: Sequence[Example], tokenizer: Any, max_length: int) -> list[TokenizedExample]:
    """Tokenize, mask the prompt, right-truncate to `max_length`; drop examples with no answer token left."""
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"train.max_length: invalid value {max_length!r} (accepted: an integer >= 2)")
    split = _chat_split if getattr(tokenizer, "chat_template", None) else _plain_split
    out: list[TokenizedExample] = []
    for example in examples:
        prompt_ids, answer_ids = split(example, tokenizer)
        input_ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
        if any(label != IGNORE_INDEX for label in labels):
            out.append(TokenizedExample(input_ids, labels))
    dropped = len(examples) - len(out)
    if dropped:
        log.warning(
            "Dropped %d of %d examples whose answer starts beyond train.max_length=%d", dropped, len(examples), max_length
        )
    return out


def _chat_split(example: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids up to and including the assistant header, answer ids through the end of the turn)."""
    user = {"role": "user", "content": example.prompt}
    assistant = {"role": "assistant", "content": example.response}
    prompt_ids = _ids(tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=True))
    full_ids = _ids(tokenizer.apply_chat_template([user, assistant], tokenize=True))
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids) :]
    return _split_rendered(example, tokenizer, user, assistant, full_ids)


def _split_rendered(
    example: Example, tokenizer: Any, user: dict[str, str], assistant: dict[str, str], full_ids: list[int]
) -> tuple[list[int], list[int]]:
    """Fallback for templates whose token ids merge across the prompt/answer boundary: split the text instead."""
    prompt_text = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template([user, assistant], tokenize=False)
    if full_text.startswith(prompt_text):
        prompt_ids = _ids(tokenizer(prompt_text, add_special_tokens=False))
        answer_ids = _ids(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False))
        return prompt_ids, answer_ids
    # The template rewrites earlier turns once an answer exists: mask the longest shared token prefix.
    prompt_ids = _ids(tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=True))
    shared = 0
    while shared < min(len(prompt_ids), len(full_ids)) and prompt_ids[shared] == full_ids[shared]:
        shared += 1
    log.debug("Chat template is not prefix-stable for %r; masking the %d shared tokens", example.prompt[:40], shared)
    return full_ids[:shared], full_ids[shared:]


def _plain_split(example: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
    """No chat template: an Alpaca-style header as the prompt, the answer followed by EOS."""
    prompt_ids = _ids(tokenizer(PLAIN_PREFIX.format(prompt=example.prompt), add_special_tokens=True))
    answer_ids = _ids(tokenizer(example.response, add_special_tokens=False))
    if tokenizer.eos_token_id is not None:
        answer_ids.append(int(tokenizer.eos_token_id))
    return prompt_ids, answer_ids


def _ids(encoded: Any) -> list[int]:
    """Plain list of ints from whatever the tokenizer returned (list, dict/BatchEncoding, tensor)."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        encoded = encoded[0]
    return [int(i) for i in encoded]
