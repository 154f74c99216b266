"""Files as the user's umask asks: safetensors writes its files 0600, which hides a run in a shared folder."""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()
"""Read once, at import: setting the umask to read it is process-wide, and other threads create files."""


def as_umask(path: str | Path) -> Path:
    """Give ``path`` (a file, or a folder and everything in it) the mode a plain ``open`` would have; returns it."""
    path, mask = Path(path), UMASK
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if p.is_file() and not p.is_symlink():
            p.chmod(0o666 & ~mask | (p.stat().st_mode & 0o111 & ~mask))
    return path
