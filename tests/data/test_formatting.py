"""tokenize_examples: chat-template prompt masking, answer labels, truncation and the plain fallback."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fedlora.data import IGNORE_INDEX, DataError, Example, TokenizedExample, tokenize_examples

EXAMPLE = Example("What is the capital of France?", "The capital of France is Paris.", "geo")


def _answer(t: TokenizedExample) -> list[int]:
    return [label for label in t.labels if label != IGNORE_INDEX]


def test_smollm2_template_is_prefix_stable(tokenizer: Any) -> None:
    user = {"role": "user", "content": EXAMPLE.prompt}
    prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=True)["input_ids"]
    full = tokenizer.apply_chat_template(
        [user, {"role": "assistant", "content": EXAMPLE.response}], tokenize=True
    )["input_ids"]
    assert full[: len(prompt)] == prompt


def test_labels_mask_exactly_the_prompt(tokenizer: Any) -> None:
    [t] = tokenize_examples([EXAMPLE], tokenizer, max_length=512)
    user = {"role": "user", "content": EXAMPLE.prompt}
    prompt = list(tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=True)["input_ids"])
    assert len(t.input_ids) == len(t.labels)
    assert t.input_ids[: len(prompt)] == prompt
    assert t.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert t.labels[len(prompt) :] == t.input_ids[len(prompt) :]
    answer = tokenizer.decode(_answer(t))
    assert answer.startswith(EXAMPLE.response)
    assert answer == EXAMPLE.response + "<|im_end|>\n"  # the model learns to stop
    assert EXAMPLE.prompt not in answer and EXAMPLE.prompt in tokenizer.decode(t.input_ids)


def test_truncation_keeps_the_start_and_drops_answerless(tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    long = Example("Count.", " ".join(str(i) for i in range(200)), "")
    [full] = tokenize_examples([long], tokenizer, max_length=4096)
    [other] = tokenize_examples([EXAMPLE], tokenizer, max_length=4096)
    n_prompt = full.labels.count(IGNORE_INDEX)
    cut = n_prompt + 5
    assert other.labels.count(IGNORE_INDEX) >= cut  # EXAMPLE's prompt alone fills the budget
    with caplog.at_level(logging.WARNING, logger="fedlora.data.formatting"):
        [kept] = tokenize_examples([long], tokenizer, max_length=cut)
    assert len(kept.input_ids) == cut == len(kept.labels)
    assert kept.input_ids == full.input_ids[:cut] and kept.labels == full.labels[:cut]
    assert len(_answer(kept)) == 5
    assert not caplog.records

    with caplog.at_level(logging.WARNING, logger="fedlora.data.formatting"):
        out = tokenize_examples([long, EXAMPLE], tokenizer, max_length=cut)
    assert out == [kept]
    assert "Dropped 1 of 2" in caplog.text


def test_max_length_validated(tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"^train\.max_length: invalid value 0"):
        tokenize_examples([EXAMPLE], tokenizer, max_length=0)


def test_chatterbot_tokenizes_with_answers(chatterbot_examples: list[Example], chatterbot_tokenized: list[TokenizedExample]) -> None:
    assert len(chatterbot_tokenized) == len(chatterbot_examples)  # nothing near 512 tokens
    assert all(_answer(t) and len(t.input_ids) == len(t.labels) for t in chatterbot_tokenized)


class _NoTemplate:
    """A tokenizer without a chat template: forces the plain Alpaca-style fallback."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.chat_template = None
        self.eos_token_id = real.eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any:
        return self._real(text, add_special_tokens=add_special_tokens)


def test_plain_fallback_without_chat_template(tokenizer: Any) -> None:
    [t] = tokenize_examples([EXAMPLE], _NoTemplate(tokenizer), max_length=512)
    prompt_len = t.labels.count(IGNORE_INDEX)
    assert tokenizer.decode(t.input_ids[:prompt_len]) == f"### Instruction:\n{EXAMPLE.prompt}\n\n### Response:\n"
    assert _answer(t)[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(_answer(t)[:-1]) == EXAMPLE.response
    assert "<|im_start|>" not in tokenizer.decode(t.input_ids)


class _UnstableTemplate(_NoTemplate):
    """A template whose full rendering re-tokenizes across the boundary, so id prefixes do not match."""

    chat_template = "fake"

    def __init__(self, real: Any) -> None:
        super().__init__(real)
        self.chat_template = "fake"

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False) -> Any:
        text = f"Q: {messages[0]['content']}\nA:"
        if len(messages) > 1:
            text += messages[1]["content"]  # no separator: "A:" merges with the answer's first token
        return self._real(text, add_special_tokens=False) if tokenize else text


def test_prefix_breaking_template_falls_back_to_text_split(tokenizer: Any) -> None:
    fake = _UnstableTemplate(tokenizer)
    example = Example("hi", ":)", "")
    prompt_ids = fake.apply_chat_template([{"content": "hi"}], tokenize=True)["input_ids"]
    full_ids = fake.apply_chat_template([{"content": "hi"}, {"content": ":)"}], tokenize=True)["input_ids"]
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the premise: ids are not prefix-stable
    [t] = tokenize_examples([example], fake, max_length=64)
    assert tokenizer.decode(t.input_ids[: t.labels.count(IGNORE_INDEX)]) == "Q: hi\nA:"
    assert tokenizer.decode(_answer(t)) == ":)"
