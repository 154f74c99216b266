"""A client's persistent base on node-local disk: each Flower message starts a fresh process.

One folder per (run, partition): ``state.json`` (the base version and the file holding the
base) and ``base-v<version>.safetensors`` with ``base/<i>/<layer>/<j>/B|A``. safetensors and
JSON only, never pickle. The JSON is written last and atomically, so a process killed midway
leaves the previous state readable; the older tensor file is removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedlora.ops.lowrank import LowRank
from fedlora.train.client import ClientState

FORMAT = 1


def state_dir(root: Path, run_id: int | str, partition: int) -> Path:
    return Path(root) / f"run-{run_id}" / f"partition-{partition}"


def load_state(folder: Path) -> ClientState:
    """The saved state, or a fresh one (version 0, empty base) when nothing was saved yet."""
    index = folder / "state.json"
    if not index.is_file():
        return ClientState()
    meta = json.loads(index.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{index}: state format {meta.get('format')!r}, expected {FORMAT}")
    tensors = load_file(folder / meta["file"]) if meta["file"] else {}
    base = []
    for i, layers in enumerate(meta["base"]):
        base.append({
            layer: [LowRank(tensors[f"base/{i}/{layer}/{j}/B"], tensors[f"base/{i}/{layer}/{j}/A"]) for j in range(n)]
            for layer, n in layers.items()
        })
    return ClientState(base=base, version=int(meta["version"]))


def save_state(folder: Path, state: ClientState) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors, layout = {}, []
    for i, delta in enumerate(state.base):
        layout.append({layer: len(terms) for layer, terms in delta.items()})
        for layer, terms in delta.items():
            for j, t in enumerate(terms):
                tensors[f"base/{i}/{layer}/{j}/B"] = t.B.contiguous().clone()
                tensors[f"base/{i}/{layer}/{j}/A"] = t.A.contiguous().clone()
    name = f"base-v{state.version}.safetensors" if tensors else ""
    if name:
        tmp = folder / (name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / name)
    index = folder / "state.json"
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "version": state.version, "file": name, "base": layout}))
    os.replace(tmp, index)
    for old in folder.iterdir():
        if re.fullmatch(r"base-v\d+\.safetensors", old.name) and old.name != name:
            old.unlink()
