"""Where instruction examples come from: the built-in ChatterBot corpus or a local JSON/JSONL file.

Every source is reduced to the same (prompt, response, category) triple so the rest of the
pipeline never cares about the original schema; `category` is kept because it is the natural
label for non-IID (Dirichlet) splits across clients.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedlora.data import DataError

log = logging.getLogger(__name__)

CHATTERBOT = "chatterbot"
CHATTERBOT_PACKAGE = "chatterbot-corpus"
CHATTERBOT_VERSION = "1.3.3"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster, same safe semantics
ACCEPTED_SOURCES = "accepted: 'chatterbot' or a .json/.jsonl file"
ACCEPTED_FIELDS = (
    "accepted field sets: Alpaca {instruction, input?, output}, "
    "Dolly {instruction, context?, response, category?}, chat {messages: [{role, content}, ...]}"
)


@dataclass(frozen=True)
class Example:
    """One supervised turn; loss is computed on `response` tokens only."""

    prompt: str  # the user turn: instruction, plus "\n\n" + input/context when present
    response: str  # the answer
    category: str  # natural group: chatterbot topic, Dolly category, "" when none


def load_examples(
    source: str, *, language: str = "english", max_examples: int | None = None, seed: int = 0
) -> list[Example]:
    """Load `source` in a deterministic order, optionally keeping a seeded random subset."""
    if source == CHATTERBOT:
        examples = _load_chatterbot(language)
    else:
        examples = _load_file(source)
    if max_examples is not None:
        if max_examples < 1:
            raise DataError(f"data.max_examples: invalid value {max_examples!r} (accepted: a positive integer or null)")
        if max_examples < len(examples):
            keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=max_examples, replace=False))
            examples = [examples[i] for i in keep]
    log.info("Loaded %d examples from %s", len(examples), source)
    return examples


# --- ChatterBot ---------------------------------------------------------------------------------


def _chatterbot_root() -> Path:
    """The corpus data folder inside the installed wheel (the package is never imported: it pulls in chatterbot)."""
    try:
        dist = importlib.metadata.distribution(CHATTERBOT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"data.source: 'chatterbot' needs the package '{CHATTERBOT_PACKAGE}', which is not installed "
            f"(run `pip install --no-deps {CHATTERBOT_PACKAGE}=={CHATTERBOT_VERSION}`, or set data.source to a .json/.jsonl file)"
        ) from None
    return Path(str(dist.locate_file("chatterbot_corpus/data")))


def _load_chatterbot(language: str) -> list[Example]:
    """Consecutive-turn pairs (turn i → turn i+1) from every topic file of `language`, topic = category."""
    root = _chatterbot_root()
    languages = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if language not in languages:
        raise DataError(f"data.language: unknown value {language!r} (accepted: {', '.join(languages)})")
    examples: list[Example] = []
    for path in sorted((root / language).glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER) or {}
        for conversation in doc.get("conversations") or []:
            turns = list(conversation) if isinstance(conversation, list) else []
            for question, answer in zip(turns, turns[1:]):
                if _is_text(question) and _is_text(answer):
                    examples.append(Example(question.strip(), answer.strip(), path.stem))
    return examples


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


# --- Local files --------------------------------------------------------------------------------


def _load_file(source: str) -> list[Example]:
    """Read a .json (list, or {"data": list}) or .jsonl file and map each record by its schema."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path} ({ACCEPTED_SOURCES})")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".json":
        records = _read_json(path)
    else:
        raise DataError(f"data.source: unsupported file type {suffix or '(none)'!r}: {path} ({ACCEPTED_SOURCES})")
    if not records:
        raise DataError(f"data.source: {path} holds no records (accepted: a non-empty list of objects)")
    convert = _detect_schema(records[0], path)
    out: list[Example] = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"data.source: {path} record {index} is a {type(record).__name__}, not an object ({ACCEPTED_FIELDS})")
        try:
            out.append(convert(record))
        except _RecordError as exc:
            raise DataError(f"data.source: {path} record {index} is invalid ({exc}); {ACCEPTED_FIELDS}") from None
    return out


def _read_json(path: Path) -> list[Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"data.source: {path} is not valid JSON ({exc}) ({ACCEPTED_SOURCES})") from None
    if isinstance(doc, Mapping) and isinstance(doc.get("data"), list):
        return doc["data"]
    if isinstance(doc, list):
        return doc
    raise DataError(f"data.source: {path} top level is a {type(doc).__name__} (accepted: a list of objects or {{\"data\": [...]}})")


def _read_jsonl(path: Path) -> list[Any]:
    records: list[Any] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"data.source: {path} line {lineno} is not valid JSON ({exc}) (accepted: one object per line)") from None
    return records


def _detect_schema(first: Any, path: Path) -> Callable[[Mapping[str, Any]], Example]:
    """Pick the record converter from the first record's keys."""
    if not isinstance(first, Mapping):
        raise DataError(f"data.source: {path} record 0 is a {type(first).__name__}, not an object; {ACCEPTED_FIELDS}")
    keys = set(first)
    if "messages" in keys:
        return _from_messages
    if {"instruction", "output"} <= keys:
        return _from_alpaca
    if {"instruction", "response"} <= keys:
        return _from_dolly
    raise DataError(f"data.source: {path} record 0 has fields {sorted(keys)}; {ACCEPTED_FIELDS}")


class _RecordError(Exception):
    """A record that does not fit its detected schema (turned into a DataError with file and index)."""


def _field(record: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    if name not in record:
        if required:
            raise _RecordError(f"missing field {name!r}")
        return ""
    value = record[name]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _RecordError(f"field {name!r} is a {type(value).__name__}, not a string")
    return value


def _join(instruction: str, extra: str) -> str:
    return f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()


def _from_alpaca(record: Mapping[str, Any]) -> Example:
    prompt = _join(_field(record, "instruction"), _field(record, "input", required=False))
    return Example(prompt, _field(record, "output").strip(), _field(record, "category", required=False))


def _from_dolly(record: Mapping[str, Any]) -> Example:
    prompt = _join(_field(record, "instruction"), _field(record, "context", required=False))
    return Example(prompt, _field(record, "response").strip(), _field(record, "category", required=False))


def _from_messages(record: Mapping[str, Any]) -> Example:
    """Last assistant turn → response; the last user turn before it → prompt."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise _RecordError("field 'messages' is not a list of {role, content} objects")
    roles = [m.get("role") for m in messages]
    if "assistant" not in roles:
        raise _RecordError("no assistant turn in 'messages'")
    last_assistant = len(roles) - 1 - roles[::-1].index("assistant")
    users = [i for i in range(last_assistant) if roles[i] == "user"]
    if not users:
        raise _RecordError("no user turn before the last assistant turn in 'messages'")
    prompt = _field(messages[users[-1]], "content")
    response = _field(messages[last_assistant], "content")
    return Example(prompt.strip(), response.strip(), _field(record, "category", required=False))
