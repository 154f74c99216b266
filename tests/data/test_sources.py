"""load_examples on JSON/JSONL files and the ChatterBot corpus: schemas, subsetting and every DataError (tabular files: test_files.py)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from fedlora.data import DataError, Example, load_examples


def _write_json(path: Path, payload: object) -> str:
    path.write_text(json.dumps(payload), encoding="utf-8")
    return str(path)


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return str(path)


def test_chatterbot_english_is_large_and_categorised(chatterbot_examples: list[Example]) -> None:
    categories = {e.category for e in chatterbot_examples}
    assert len(chatterbot_examples) > 1500
    assert len(categories) > 15
    assert {"ai", "greetings", "trivia"} <= categories
    assert all(e.prompt.strip() and e.response.strip() for e in chatterbot_examples)
    assert Example("What is AI?", chatterbot_examples[0].response, "ai") == chatterbot_examples[0]


class _FakeDistribution:
    """Stands in for the installed chatterbot-corpus wheel, rooted at a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def locate_file(self, path: str) -> Path:
        return self.root / path


def test_chatterbot_pairs_consecutive_turns_and_skips_bad_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topic_dir = tmp_path / "chatterbot_corpus" / "data" / "toy"
    topic_dir.mkdir(parents=True)
    (topic_dir / "b_small.yml").write_text(
        "conversations:\n- - Hi\n  - Hello\n  - How are you?\n  - Fine.\n- - Q\n  - 42\n  - ' '\n- just a string\n",
        encoding="utf-8",
    )
    (topic_dir / "a_first.yml").write_text("conversations:\n- - Ping\n  - Pong\n", encoding="utf-8")
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: _FakeDistribution(tmp_path))
    assert load_examples("chatterbot", language="toy") == [
        Example("Ping", "Pong", "a_first"),  # sorted topic files
        Example("Hi", "Hello", "b_small"),
        Example("Hello", "How are you?", "b_small"),
        Example("How are you?", "Fine.", "b_small"),
    ]


def test_chatterbot_order_is_deterministic_and_other_languages_load(chatterbot_examples: list[Example]) -> None:
    assert load_examples("chatterbot") == chatterbot_examples
    spanish = load_examples("chatterbot", language="spanish")
    assert spanish and spanish[0] not in chatterbot_examples


def test_chatterbot_unknown_language_lists_available() -> None:
    with pytest.raises(DataError, match=r"^data\.language: unknown value 'klingon' \(accepted: .*english.*spanish"):
        load_examples("chatterbot", language="klingon")


def test_chatterbot_missing_package_tells_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"^data\.source: 'chatterbot' needs .*`pip install --no-deps chatterbot-corpus==1\.3\.3`"):
        load_examples("chatterbot")


def test_max_examples_is_a_seeded_subset(chatterbot_examples: list[Example]) -> None:
    a = load_examples("chatterbot", max_examples=50, seed=1)
    assert len(a) == 50
    assert a == load_examples("chatterbot", max_examples=50, seed=1)
    assert a != load_examples("chatterbot", max_examples=50, seed=2)
    assert set(a) <= set(chatterbot_examples)
    assert a != chatterbot_examples[:50]  # random, not the head
    assert load_examples("chatterbot", max_examples=10**6) == chatterbot_examples
    with pytest.raises(DataError, match=r"^data\.max_examples: invalid value 0"):
        load_examples("chatterbot", max_examples=0)


def test_alpaca_json_list(tmp_path: Path) -> None:
    source = _write_json(
        tmp_path / "alpaca.json",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        ],
    )
    assert load_examples(source) == [
        Example("Add the numbers.\n\nInput:\n2 and 3", "5", ""),
        Example("Say hi.", "Hi!", ""),
    ]


def test_dolly_jsonl(tmp_path: Path) -> None:
    source = _write_jsonl(
        tmp_path / "dolly.jsonl",
        [
            {"instruction": "Who wrote it?", "context": "Hamlet is a play.", "response": "Shakespeare.", "category": "closed_qa"},
            {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "brainstorming"},
        ],
    )
    assert load_examples(source) == [
        Example("Who wrote it?\n\nContext:\nHamlet is a play.", "Shakespeare.", "closed_qa"),
        Example("Name a colour.", "Blue.", "brainstorming"),
    ]


def test_messages_json_wrapped_in_data(tmp_path: Path) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "Second answer"},
        {"role": "user", "content": "Unanswered follow-up"},
    ]
    source = _write_json(tmp_path / "chat.json", {"data": [{"messages": chat}]})
    assert load_examples(source) == [Example("Second question", "Second answer", "")]


def test_missing_file() -> None:
    with pytest.raises(
        DataError,
        match=r"^data\.source: file not found: .*nope\.json \(accepted: 'chatterbot', 'news', 'rotten-tomatoes', "
        r"'healthtweets', 'fortunes', or a \.json/\.jsonl/\.csv/\.parquet file or a datasets\.save_to_disk folder\)$",
    ):
        load_examples("/no/such/dir/nope.json")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("instruction,output\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^data\.source: unsupported file type '\.txt'.*accepted: a \.json/\.jsonl/\.csv"):
        load_examples(str(path))


def test_record_missing_field_names_file_index_and_field_sets(tmp_path: Path) -> None:
    source = _write_json(
        tmp_path / "broken.json",
        [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d"}],
    )
    with pytest.raises(DataError, match=r"^data\.source: .*broken\.json record 1 .*'output'.*accepted field sets: Alpaca") as err:
        load_examples(source)
    assert "\n" not in str(err.value)  # one line


def test_unknown_schema_and_bad_messages(tmp_path: Path) -> None:
    unknown = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"odd\.jsonl record 0 has fields \['answer', 'question'\]; accepted field sets"):
        load_examples(unknown)
    no_answer = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl record 0 is invalid \(no assistant turn"):
        load_examples(no_answer)


def test_invalid_json_and_non_string_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"^data\.source: .*bad\.jsonl line 2 is not valid JSON"):
        load_examples(str(bad))
    typed = _write_json(tmp_path / "typed.json", [{"instruction": "a", "output": 5}])
    with pytest.raises(DataError, match=r"typed\.json record 0 is invalid \(field 'output' is a int"):
        load_examples(typed)
    empty = _write_json(tmp_path / "empty.json", [])
    with pytest.raises(DataError, match=r"^data\.source: .*empty\.json holds no records"):
        load_examples(empty)
