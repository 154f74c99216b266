"""Turn examples into token ids: the model's chat template with answer-only labels, plain text, or class labels.

Training on the template the model was instruction-tuned with keeps fine-tuning in its
native format; masking the prompt (-100) means the loss measures only how well the model
answers, and keeping the closing end-of-turn token in the labels teaches it to stop.
Kind "text" (causal-LM training on raw text) uses no template and trains on every token.
Kind "label" becomes a chat turn (text → label name) for a causal LM, or
`tokenize_for_classification` for an encoder with a classification head.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlora.data import DataError
from fedlora.data.example import LABEL, TEXT, Example

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
PLAIN_PREFIX = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass(frozen=True)
class TokenizedExample:
    """Model input and its labels, aligned token by token."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt (and template) tokens, token ids on the answer tokens


@dataclass(frozen=True)
class ClassifiedExample:
    """Encoder input (with the tokenizer's special tokens) and its class index."""

    input_ids: list[int]
    label: int  # index into the label_names given to tokenize_for_classification


@dataclass
class TokenizeStats:
    """Counts a caller can report; one object may be passed to many calls and accumulates over them."""

    total: int = 0  # examples seen
    kept: int = 0  # examples returned
    truncated: int = 0  # returned examples cut at max_length
    dropped: int = 0  # examples left out: no answer token within max_length, or no token at all
    tokens: int = 0  # tokens in the returned examples
    dropped_indices: list[int] = field(default_factory=list)  # positions among all examples this object has seen

    def summary(self, max_length: int) -> str:
        return (
            f"kept {self.kept} of {self.total} examples ({self.tokens} tokens); {self.truncated} truncated to "
            f"{max_length} tokens; {self.dropped} dropped with no answer within train.max_length"
        )


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    *,
    train_on_inputs: bool = False,
    stats: TokenizeStats | None = None,
) -> list[TokenizedExample]:
    """Tokenize, label, right-truncate to `max_length`; drop examples with no answer token left.

    chat/label: the chat template when the tokenizer has one, an Alpaca-style prompt otherwise; the
    prompt is masked unless `train_on_inputs`. text: the text's tokens + EOS, all of them labels.
    Truncated and dropped examples are logged (INFO / WARNING). Pass `stats` to collect the counts, over one
    or many calls, and report them once with `stats.summary(max_length)`; the per-call lines then go to DEBUG.
    """
    _check_max_length(max_length)
    split = _chat_split if getattr(tokenizer, "chat_template", None) else _plain_split
    quiet = stats is not None  # the caller collects the counts and reports them once: per-call lines go to DEBUG
    stats = stats if stats is not None else TokenizeStats()
    offset = stats.total
    out: list[TokenizedExample] = []
    truncated = 0
    for position, example in enumerate(examples):
        if example.kind == TEXT:
            prompt_ids, answer_ids = [], _text_ids(example.response, tokenizer)
        else:
            prompt_ids, answer_ids = split(example, tokenizer)
        full = prompt_ids + answer_ids
        mask = prompt_ids if not train_on_inputs else []
        labels = [IGNORE_INDEX] * len(mask) + full[len(mask) :]
        if answer_ids and len(prompt_ids) < max_length:
            out.append(TokenizedExample(full[:max_length], labels[:max_length]))
            truncated += len(full) > max_length
        else:
            stats.dropped_indices.append(offset + position)
    dropped = len(examples) - len(out)
    stats.total += len(examples)
    stats.kept += len(out)
    stats.truncated += truncated
    stats.dropped += dropped
    stats.tokens += sum(len(t.input_ids) for t in out)
    if dropped:
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "Dropped %d of %d examples whose answer starts beyond train.max_length=%d", dropped, len(examples), max_length,
        )
    if truncated:
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "Truncated %d of %d examples to train.max_length=%d tokens", truncated, len(examples), max_length,
        )
    return out


def tokenize_for_classification(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    label_names: Sequence[str],
    *,
    stats: TokenizeStats | None = None,
) -> list[ClassifiedExample]:
    """Encode label examples as plain text with the tokenizer's special tokens ([CLS] … [SEP] for BERT).

    Texts longer than `max_length` are truncated by the tokenizer (its closing special token kept);
    the label name becomes its index in `label_names`.
    """
    _check_max_length(max_length)
    index = {name: i for i, name in enumerate(label_names)}
    for position, example in enumerate(examples):
        if example.kind != LABEL:
            raise DataError(
                f"data.source: tokenize_for_classification needs examples of kind 'label', "
                f"example {position} is of kind {example.kind!r} (accepted: a label corpus or a file with text and label fields)"
            )
        if example.response not in index:
            raise DataError(f"data.source: example {position} has label {example.response!r}, not one of {list(label_names)}")
    texts = [e.prompt for e in examples]
    ids = [_ids_of(e) for e in tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length)
        for i, row in zip(long, cut["input_ids"]):
            ids[i] = _ids_of(row)
        level = logging.DEBUG if stats is not None else logging.INFO
        log.log(level, "Truncated %d of %d texts to train.max_length=%d tokens", len(long), len(texts), max_length)
    out = [ClassifiedExample(row, index[e.response]) for row, e in zip(ids, examples)]
    if stats is not None:
        stats.total += len(examples)
        stats.kept += len(out)
        stats.truncated += len(long)
        stats.tokens += sum(len(c.input_ids) for c in out)
    return out


def label_names_of(examples: Sequence[Example]) -> list[str]:
    """The sorted distinct label names of label examples (the class order for a classifier head)."""
    return sorted({e.response for e in examples if e.kind == LABEL})


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"train.max_length: invalid value {max_length!r} (accepted: an integer >= 2)")


def _text_ids(text: str, tokenizer: Any) -> list[int]:
    """Plain text: the tokenizer's own special tokens (a BOS where the model uses one), the text, then EOS."""
    ids = _ids(tokenizer(text, add_special_tokens=True))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and ids and ids[-1] != eos:
        ids.append(int(eos))
    return ids


def _ids_of(row: Any) -> list[int]:
    return [int(i) for i in row]


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
