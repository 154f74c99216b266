"""A node's persistent frozen base on node-local disk: each Flower message starts a fresh process.

One folder per (run, partition): ``state.json`` (the base version and the file holding it) and
``base-v<version>.safetensors`` with ``base/<layer>`` = D_v, the merges the base holds, as the
model host accumulated them (``AdapterHost.base_state``). Its size is the adapted layers' size
whatever the number of rounds (methods.md §4); a node of a method that never merges keeps
version 0 and no tensors. safetensors and JSON only, never pickle. The JSON is written last and
atomically, so a process killed midway leaves the previous state readable; the older tensor
file is removed afterwards.

What a method keeps on the client (``Method.keeps``: FedSA-LoRA's B) sits beside it as
``kept-r<round>.safetensors``, one file per round it trained in, the newest two only. A round
starts from the newest file of an *earlier* round, so a round redone after the ServerApp
restarted from its checkpoint starts where it started the first time.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlora.filemode import as_umask

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
        as_umask(tmp)
        os.replace(tmp, folder / name)
    index = folder / "state.json"
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "version": version, "file": name}))
    os.replace(tmp, index)
    for old in folder.iterdir():
        if re.fullmatch(r"base-v\d+\.safetensors", old.name) and old.name != name:
            old.unlink()


_KEPT = re.compile(r"kept-r(\d+)\.safetensors")


def load_kept(folder: Path, before: int) -> dict[str, torch.Tensor] | None:
    """What the client kept after its newest round earlier than ``before`` (None: it never trained)."""
    rounds = sorted(int(m.group(1)) for p in folder.glob("kept-r*.safetensors") if (m := _KEPT.fullmatch(p.name)) and int(m.group(1)) < before)
    return load_file(folder / f"kept-r{rounds[-1]}.safetensors") if rounds else None


def save_kept(folder: Path, round: int, kept: dict[str, torch.Tensor]) -> None:
    """Store round ``round``'s kept tensors atomically; keep this file and the newest earlier one."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"kept-r{round}.safetensors"
    tmp = folder / (final.name + ".tmp")
    save_file({k: t.detach().to("cpu").contiguous() for k, t in kept.items()}, str(tmp))
    as_umask(tmp)
    os.replace(tmp, final)
    rounds = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _KEPT.fullmatch(p.name)))
    older = [r for r in rounds if r < round]
    for r in rounds:
        if r > round or (r < round and r != older[-1]):
            (folder / f"kept-r{r}.safetensors").unlink()
