"""load_examples on CSV, Parquet and save_to_disk folders; text/label schemas; text_field, label_field, by."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from fedlora.data import DataError, Example, load_examples

DOLLY = [
    {"instruction": "Who wrote it?", "context": "Hamlet is a play.", "response": "Shakespeare.", "category": "closed_qa"},
    {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "brainstorming"},
    {"instruction": "Sum 2 and 2.", "context": "", "response": "4", "category": "closed_qa"},
]
DOLLY_EXAMPLES = [
    Example("Who wrote it?\n\nContext:\nHamlet is a play.", "Shakespeare.", "closed_qa", "chat"),
    Example("Name a colour.", "Blue.", "brainstorming", "chat"),
    Example("Sum 2 and 2.", "4", "closed_qa", "chat"),
]
REVIEWS = {"text": ["A joy.", "Dull and long.", "Fine film."], "label": [1, 0, 1]}


def _sentiment() -> datasets.Dataset:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    return datasets.Dataset.from_dict(REVIEWS, features=features)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "disk"])
def test_dolly_round_trips_through_every_format(tmp_path: Path, fmt: str) -> None:
    ds = datasets.Dataset.from_list(DOLLY)
    target = tmp_path / (f"dolly.{fmt}" if fmt != "disk" else "dolly_folder")
    if fmt == "jsonl":
        target.write_text("\n".join(json.dumps(r) for r in DOLLY) + "\n", encoding="utf-8")
    elif fmt == "json":
        target.write_text(json.dumps(DOLLY), encoding="utf-8")
    elif fmt == "csv":
        ds.to_csv(str(target), index=False)
    elif fmt == "parquet":
        ds.to_parquet(str(target))
    else:
        ds.save_to_disk(str(target))
    assert load_examples(str(target)) == DOLLY_EXAMPLES


def test_csv_text_and_label_schemas(tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    plain.write_text('text,source\n"First, a story.",blog\n,blog\n"Second\nline.",paper\n', encoding="utf-8")
    assert load_examples(str(plain)) == [  # the empty row is skipped
        Example("", "First, a story.", "", "text"),
        Example("", "Second\nline.", "", "text"),
    ]
    assert [e.category for e in load_examples(str(plain), by="source")] == ["blog", "paper"]

    labelled = tmp_path / "labelled.csv"
    datasets.Dataset.from_dict(REVIEWS).to_csv(str(labelled), index=False)
    assert load_examples(str(labelled)) == [
        Example("A joy.", "1", "1", "label"),  # no ClassLabel in a CSV: str(value)
        Example("Dull and long.", "0", "0", "label"),
        Example("Fine film.", "1", "1", "label"),
    ]


@pytest.mark.parametrize("fmt", ["parquet", "disk", "disk-dict"])
def test_class_label_names_survive_parquet_and_save_to_disk(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "sentiment"
    if fmt == "parquet":
        target = target.with_suffix(".parquet")
        _sentiment().to_parquet(str(target))
    elif fmt == "disk":
        _sentiment().save_to_disk(str(target))
    else:
        datasets.DatasetDict({"train": _sentiment(), "test": _sentiment().select([0])}).save_to_disk(str(target))
    examples = load_examples(str(target))
    assert [(e.prompt, e.response, e.category, e.kind) for e in examples] == [
        ("A joy.", "pos", "pos", "label"),
        ("Dull and long.", "neg", "neg", "label"),
        ("Fine film.", "pos", "pos", "label"),
    ]


def test_other_field_names_and_by(tmp_path: Path) -> None:
    path = tmp_path / "reviews.jsonl"
    rows = [{"sentence": "Great.", "sentiment": "pos", "movie": "a"}, {"sentence": "Bad.", "sentiment": "neg", "movie": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert load_examples(str(path), text_field="sentence", label_field="sentiment") == [
        Example("Great.", "pos", "pos", "label"),
        Example("Bad.", "neg", "neg", "label"),
    ]
    by_movie = load_examples(str(path), text_field="sentence", label_field="sentiment", by="movie")
    assert [(e.response, e.category) for e in by_movie] == [("pos", "a"), ("neg", "b")]
    assert load_examples(str(path), text_field="sentence") == [Example("", "Great.", "", "text"), Example("", "Bad.", "", "text")]
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("\n".join(json.dumps(r) for r in DOLLY), encoding="utf-8")
    assert [e.category for e in load_examples(str(dolly), by="context")][:2] == ["Hamlet is a play.", ""]


def test_field_errors_name_their_setting(tmp_path: Path) -> None:
    path = tmp_path / "reviews.jsonl"
    path.write_text(json.dumps({"sentence": "Great.", "sentiment": "pos"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^data\.text_field: .*reviews\.jsonl has no field 'text' \(accepted: one of \['sentence', 'sentiment'\]\)$"):
        load_examples(str(path), label_field="sentiment")
    with pytest.raises(DataError, match=r"^data\.label_field: .*has no field 'stars'"):
        load_examples(str(path), text_field="sentence", label_field="stars")
    with pytest.raises(DataError, match=r"^data\.by: .*has no field 'movie' \(accepted: category, label or one of"):
        load_examples(str(path), text_field="sentence", by="movie")
    with pytest.raises(DataError, match=r"^data\.source: .*record 0 has fields \['sentence', 'sentiment'\]; accepted field sets: .*label \{text, label\}"):
        load_examples(str(path))
    with pytest.raises(DataError, match=r"^data\.text_field: only applies to local files, not the built-in corpus 'chatterbot'"):
        load_examples("chatterbot", text_field="text")


def test_unreadable_tabular_and_foreign_folder(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"^data\.source: cannot read .*bad\.parquet as PARQUET \(") as err:
        load_examples(str(bad))
    assert "\n" not in str(err.value)
    folder = tmp_path / "just_a_folder"
    folder.mkdir()
    with pytest.raises(DataError, match=r"^data\.source: .*just_a_folder is a folder but not a datasets\.save_to_disk folder"):
        load_examples(str(folder))
    splits = tmp_path / "splits"
    datasets.DatasetDict({"a": _sentiment(), "b": _sentiment()}).save_to_disk(str(splits))
    with pytest.raises(DataError, match=r"^data\.source: .*splits holds splits \['a', 'b'\] \(accepted: .*'train' split\)"):
        load_examples(str(splits))


def test_missing_label_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b", "label": None}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^data\.source: .*gaps\.jsonl record 1 is invalid \(field 'label' is empty\)"):
        load_examples(str(path))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_empty_or_blank_answers_are_skipped_and_counted_in_every_format(tmp_path: Path, fmt: str, caplog) -> None:
    """Nothing to learn from an empty answer: skipped with a warning, the same for a JSON "" and an empty CSV cell."""
    rows = [*DOLLY, {"instruction": "Say nothing.", "context": "", "response": "   ", "category": "x"},
            {"instruction": "  ", "context": "", "response": "Orphan.", "category": "x"}]
    target = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        rows[3]["response"] = ""  # an empty cell
        datasets.Dataset.from_list(rows).to_csv(str(target), index=False)
    else:
        target.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with caplog.at_level("WARNING"):
        assert load_examples(str(target)) == DOLLY_EXAMPLES
    assert any("Skipped 2 of 5 records" in m and "empty instruction or response" in m for m in caplog.messages), caplog.messages


def test_a_file_of_only_empty_answers_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "d.jsonl"
    target.write_text(json.dumps({"instruction": "Hi", "output": ""}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"data.source: every one of the 1 records .* has an empty instruction or output"):
        load_examples(str(target))


def test_a_file_without_categories_says_the_split_ignores_them(tmp_path: Path, caplog) -> None:
    target = tmp_path / "alpaca.jsonl"
    target.write_text("".join(json.dumps({"instruction": f"Q{i}", "input": "x" * i, "output": "A"}) + "\n" for i in range(3)), encoding="utf-8")
    with caplog.at_level("WARNING"):
        examples = load_examples(str(target))
    assert examples[1].prompt == "Q1\n\nInput:\nx"  # Alpaca's input under its label, as the Alpaca template does
    assert {e.category for e in examples} == {""}
    assert any("no category field" in m and "data.by=" in m for m in caplog.messages), caplog.messages
