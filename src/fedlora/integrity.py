"""SHA-256 of the files a run leaves for later use, checked before they are used.

A folder is sealed with a ``SHA256SUMS`` file in the format of coreutils' ``sha256sum`` (so
``cd FOLDER && sha256sum -c SHA256SUMS`` checks it by hand too). A flipped byte or a cut file in a
final adapter, an exported one or a node's state is then refused in one line instead of being
used as if it were the run's result.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

SUMS = "SHA256SUMS"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seal(folder: Path) -> Path:
    """Write ``folder/SHA256SUMS`` over every file under ``folder`` (sub-folders included); atomic."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS and not p.name.endswith(".tmp"))
    text = "".join(f"{sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)
    tmp = folder / (SUMS + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, folder / SUMS)
    return folder / SUMS


def damage(folder: Path) -> str | None:
    """What is wrong with a sealed folder (None: intact, or never sealed: older runs have no sums)."""
    sums = folder / SUMS
    if not sums.is_file():
        return None
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return f"{sums} is unreadable"
    for line in lines:
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            return f"{sums} is damaged (a line is not '<sha256>  <file>')"
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256(path) != digest:
            return f"{path} does not match its SHA-256 in {SUMS}"
    return None


def sealed(folder: Path) -> bool:
    return (folder / SUMS).is_file()


def write_folder(final: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a hidden sibling of ``final``, then put it in ``final``'s place (a run's or a node's
    ``final/`` adapter): a process killed at any point leaves the previous ``final`` or none, never a half-written one,
    and hidden leftovers that the next call removes. Nothing happens to ``final`` when ``write`` writes nothing."""
    for stale in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp, old = final.parent / f".{final.name}.tmp-{os.getpid()}", final.parent / f".{final.name}.old-{os.getpid()}"
    write(tmp)
    if not tmp.exists():  # a method whose adapters stay with the clients writes none on the server
        return
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
