"""A node's persistent frozen base on node-local disk: each Flower message starts a fresh process.

One folder per (run, partition): ``state.json`` (the base version and the file holding it) and
``base-v<version>.safetensors`` with ``base/<layer>`` = D_v, the merges the base holds, as the
model host accumulated them (``AdapterHost.base_state``). Its size is the adapted layers' size
whatever the number of rounds (methods.md §4); a node of a method that never merges keeps
version 0 and no tensors. safetensors and JSON only, never pickle. The JSON is written last and
atomically, so a process killed midway leaves the previous state readable; the older tensor
file is removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = 2


def state_dir(root: Path, run_id: int | str, partition: int) -> Path:
    return Path(root) / f"run-{run_id}" / f"partition-{partition}"


def load_state(folder: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(version, D_v per layer) as saved, or (0, {}) when nothing was saved yet."""
    index = folder / "state.json"
    if not index.is_file():
        return 0, {}
    meta = json.loads(index.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{index}: state format {meta.get('format')!r}, expected {FORMAT}")
    tensors = load_file(folder / meta["file"]) if meta["file"] else {}
    return int(meta["version"]), {k.removeprefix("base/"): t for k, t in tensors.items()}


def save_state(folder: Path, version: int, base: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"base-v{version}.safetensors" if base else ""
    if name:
        tmp = folder / (name + ".tmp")
        save_file({f"base/{layer}": t.detach().to("cpu").contiguous() for layer, t in base.items()}, str(tmp))
        os.replace(tmp, folder / name)
    index = folder / "state.json"
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "version": version, "file": name}))
    os.replace(tmp, index)
    for old in folder.iterdir():
        if re.fullmatch(r"base-v\d+\.safetensors", old.name) and old.name != name:
            old.unlink()
