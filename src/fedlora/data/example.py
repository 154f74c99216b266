"""The one record type every source is reduced to, whatever its original schema."""

from __future__ import annotations

from dataclasses import dataclass

CHAT, TEXT, LABEL = "chat", "text", "label"
KINDS = (CHAT, TEXT, LABEL)


@dataclass(frozen=True)
class Example:
    """One training example; `kind` says how it becomes tokens.

    - "chat":  instruction → answer; loss on the answer (`prompt` = user turn, `response` = answer).
    - "text":  plain text for causal-LM training; `prompt` is "", `response` is the text, loss on all of it.
    - "label": classification; `prompt` is the text, `response` is the label name.

    `category` is the natural group the partitions skew over (`data.by`): a chatterbot topic, a Dolly
    category, a news outlet, the label of a label corpus; "" when there is none.
    """

    prompt: str
    response: str
    category: str
    kind: str = CHAT

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Example.kind must be one of {KINDS}, got {self.kind!r}")
