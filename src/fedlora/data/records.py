"""Local files → Examples: read the records, detect the schema from the field names, map each record.

JSON/JSONL are read here (line- and record-precise errors, the `{"data": [...]}` wrapper); CSV,
Parquet and `datasets.save_to_disk` folders are read with `datasets`, which works offline on local
files and keeps ClassLabel names. Every schema ends as the same `Example`, so nothing downstream
cares where the data came from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.data import DataError
from fedlora.data.example import CHAT, LABEL, TEXT, Example

log = logging.getLogger(__name__)

FILE_TYPES = "a .json/.jsonl/.csv/.parquet file or a datasets.save_to_disk folder"
TABULAR = {".csv": "csv", ".parquet": "parquet"}
ACCEPTED_FIELDS = (
    "accepted field sets: Alpaca {instruction, input?, output}, Dolly {instruction, context?, response, category?}, "
    "chat {messages: [{role, content}, ...]}, label {text, label}, text {text}; "
    "other column names via data.text_field / data.label_field"
)


def load_file(source: str, *, by: str, text_field: str | None, label_field: str | None) -> list[Example]:
    """Examples from a local file or save_to_disk folder, in file order."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    class_names: dict[str, list[str]] = {}
    try:
        if path.is_dir():
            records, class_names = _read_saved(path)
        elif suffix == ".jsonl":
            records = _read_jsonl(path)
        elif suffix == ".json":
            records = _read_json(path)
        elif suffix in TABULAR:
            records, class_names = _read_tabular(path, TABULAR[suffix])
        else:
            raise DataError(f"data.source: unsupported file type {suffix or '(none)'!r}: {path} (accepted: {FILE_TYPES})")
    except UnicodeDecodeError as e:
        raise DataError(f"data.source: {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}) "
                        "(accepted: UTF-8 files; convert with e.g. `iconv -f latin1 -t utf-8`)") from None
    return examples_from_records(records, str(path), by=by, text_field=text_field, label_field=label_field, class_names=class_names)


# --- Reading ------------------------------------------------------------------------------------


def _read_json(path: Path) -> list[Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"data.source: {path} is not valid JSON ({exc}) (accepted: {FILE_TYPES})") from None
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


@contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """The `datasets` module with its progress bars off for the duration (restored afterwards)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_tabular(path: Path, builder: str) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path} (accepted: {FILE_TYPES})")
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # pyarrow/pandas parse errors come in many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"data.source: cannot read {path} as {builder.upper()} ({first})") from None
    return _rows(ds)


def _read_saved(path: Path) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """A `save_to_disk` folder: a Dataset, or a DatasetDict whose 'train' (or only) split is used."""
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"data.source: {path} is a folder but not a datasets.save_to_disk folder (accepted: {FILE_TYPES})") from None
        except (ValueError, OSError) as e:  # a folder that looks like one but holds bad JSON or files
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise DataError(f"data.source: {path} looks like a datasets.save_to_disk folder but cannot be read ({first}) (accepted: {FILE_TYPES})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if "train" not in ds and len(splits) != 1:
            raise DataError(f"data.source: {path} holds splits {splits} (accepted: a Dataset, or a DatasetDict with a 'train' split)")
        ds = ds["train" if "train" in ds else splits[0]]
    return _rows(ds)


def _rows(ds: Any) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    from datasets import ClassLabel

    names = {column: list(feature.names) for column, feature in ds.features.items() if isinstance(feature, ClassLabel)}
    return ds.to_list(), names


# --- Schemas ------------------------------------------------------------------------------------


class _RecordError(Exception):
    """A record that does not fit its detected schema (turned into a DataError with file and index)."""


@dataclass(frozen=True)
class _Schema:
    kind: str
    convert: Callable[[Mapping[str, Any], _Schema], tuple[str, str] | None]  # (prompt, response); None = skip
    text: str = "text"
    label: str | None = None
    label_names: Sequence[str] | None = None


def examples_from_records(
    records: Sequence[Any],
    where: str,
    *,
    by: str = "category",
    text_field: str | None = None,
    label_field: str | None = None,
    class_names: Mapping[str, Sequence[str]] | None = None,
) -> list[Example]:
    """Map records (dicts) to Examples with the schema detected from the first record's fields."""
    if not records:
        raise DataError(f"data.source: {where} holds no records (accepted: a non-empty list of objects)")
    first = records[0]
    if not isinstance(first, Mapping):
        raise DataError(f"data.source: {where} record 0 is a {type(first).__name__}, not an object; {ACCEPTED_FIELDS}")
    names = dict(class_names or {})
    schema = _detect(set(first), where, text_field, label_field, names)
    category_of = _category_getter(by, schema, set(first), where, names)
    out: list[Example] = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"data.source: {where} record {index} is a {type(record).__name__}, not an object ({ACCEPTED_FIELDS})")
        try:
            pair = schema.convert(record, schema)
            if pair is not None:
                out.append(Example(pair[0], pair[1], category_of(record), schema.kind))
        except _RecordError as exc:
            raise DataError(f"data.source: {where} record {index} is invalid ({exc}); {ACCEPTED_FIELDS}") from None
    if not out:
        raise DataError(f"data.source: every one of the {len(records)} records of {where} has an empty {schema.text} (accepted: records with text)")
    if len(out) < len(records):
        log.warning("Skipped %d of %d records of %s with an empty %s (nothing to learn from)", len(records) - len(out), len(records), where, schema.text)
    if category_of is _NO_CATEGORY and by == "category":
        log.warning("%s has no category field: the partition deals its examples without categories (accepted: data.by=<a field> for a skewed split)", where)
    return out


def _detect(
    columns: set[str], where: str, text_field: str | None, label_field: str | None, class_names: Mapping[str, Sequence[str]]
) -> _Schema:
    """Explicit text_field/label_field win; otherwise the field names decide."""
    if text_field is None and label_field is None:
        if "messages" in columns:
            return _Schema(CHAT, _from_messages, text="user or assistant turn")
        if {"instruction", "output"} <= columns:
            return _Schema(CHAT, _from_instruction("input", "output", "Input"), text="instruction or output")
        if {"instruction", "response"} <= columns:
            return _Schema(CHAT, _from_instruction("context", "response", "Context"), text="instruction or response")
        if "text" not in columns:
            raise DataError(f"data.source: {where} record 0 has fields {sorted(columns)}; {ACCEPTED_FIELDS}")
    text = text_field or "text"
    if text not in columns:
        raise DataError(f"data.text_field: {where} has no field {text!r} (accepted: one of {sorted(columns)})")
    if label_field is not None and label_field not in columns:
        raise DataError(f"data.label_field: {where} has no field {label_field!r} (accepted: one of {sorted(columns)})")
    label = label_field or ("label" if "label" in columns else None)
    if label is None:
        return _Schema(TEXT, _from_text, text=text)
    return _Schema(LABEL, _from_label, text=text, label=label, label_names=class_names.get(label))


def _category_getter(
    by: str, schema: _Schema, columns: Collection[str], where: str, class_names: Mapping[str, Sequence[str]]
) -> Callable[[Mapping[str, Any]], str]:
    """`by` names the column whose value is the category; "category" falls back to the schema's natural one."""
    if by == "category" and "category" not in columns:
        column = schema.label  # the label for label data, nothing otherwise
    elif by == "label" and schema.kind == LABEL:
        column = schema.label
    elif by in columns:
        column = by
    else:
        raise DataError(f"data.by: {where} has no field {by!r} (accepted: category, label or one of {sorted(columns)})")
    if column is None:
        return _NO_CATEGORY
    names = class_names.get(column)
    return lambda record: _name(record.get(column), names, column)


def _NO_CATEGORY(record: Mapping[str, Any]) -> str:
    """The category of every example of a source without one."""
    return ""


def _name(value: Any, names: Sequence[str] | None, field: str) -> str:
    """A field value as a string; ClassLabel integers become their names."""
    if value is None:
        return ""
    if names is not None and isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(names):
            raise _RecordError(f"field {field!r} is {value}, not a class index 0..{len(names) - 1}")
        return names[value]
    return str(value)


def _field(record: Mapping[str, Any], name: str, *, required: bool = True, empty_ok: bool = False) -> str:
    """A string field; an absent optional one, or (``empty_ok``) a null or an empty table cell (NaN), is ""."""
    if name not in record:
        if required:
            raise _RecordError(f"missing field {name!r}")
        return ""
    value = record[name]
    if (value is None or (isinstance(value, float) and value != value)) and (empty_ok or not required):
        return ""
    if not isinstance(value, str):
        raise _RecordError(f"field {name!r} is a {type(value).__name__}, not a string")
    return value


def _join(instruction: str, extra: str, label: str) -> str:
    """The instruction, then the extra text under its label (Alpaca's "Input:", Dolly's "Context:"), so a model
    can tell what to do from what to read."""
    return f"{instruction.strip()}\n\n{label}:\n{extra.strip()}" if extra.strip() else instruction.strip()


def _from_instruction(extra: str, answer: str, label: str) -> Callable[[Mapping[str, Any], _Schema], tuple[str, str] | None]:
    """Alpaca {instruction, input?, output} and Dolly {instruction, context?, response}; None (skipped, counted) when
    the instruction or the answer is empty or only whitespace: there is nothing to learn from it."""

    def convert(record: Mapping[str, Any], schema: _Schema) -> tuple[str, str] | None:
        instruction, response = _field(record, "instruction", empty_ok=True), _field(record, answer, empty_ok=True).strip()
        if not instruction.strip() or not response:
            return None
        return _join(instruction, _field(record, extra, required=False), label), response

    return convert


def _from_messages(record: Mapping[str, Any], schema: _Schema) -> tuple[str, str] | None:
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
    prompt, answer = _field(messages[users[-1]], "content").strip(), _field(messages[last_assistant], "content").strip()
    return (prompt, answer) if prompt and answer else None


def _text(record: Mapping[str, Any], schema: _Schema) -> str | None:
    value = record.get(schema.text)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise _RecordError(f"field {schema.text!r} is a {type(value).__name__}, not a string")
    return value.strip()


def _from_text(record: Mapping[str, Any], schema: _Schema) -> tuple[str, str] | None:
    text = _text(record, schema)
    return None if text is None else ("", text)


def _from_label(record: Mapping[str, Any], schema: _Schema) -> tuple[str, str] | None:
    text = _text(record, schema)
    if text is None:
        return None
    assert schema.label is not None
    label = _name(record.get(schema.label), schema.label_names, schema.label)
    if not label:
        raise _RecordError(f"field {schema.label!r} is empty")
    return text, label
