"""A node's persistent frozen base on node-local disk: each Flower message starts a fresh process.

One folder per (run, partition): ``state.json`` (the base version and the file holding it) and
``base-v<version>.safetensors`` with ``base/<layer>`` = D_v, the merges the base holds, as the
model host accumulated them (``AdapterHost.base_state``). Its size is the adapted layers' size
whatever the number of rounds (methods.md §4); a node of a method that never merges keeps
version 0 and no tensors. safetensors and JSON only, never pickle. The JSON is written last and
atomically, so a process killed midway leaves the previous state readable; the older tensor
file is removed afterwards. The JSON carries the SHA-256 of the tensor file and of itself: a
damaged state is never used as a base. The node drops it and asks the server for the whole base
(``NodeStateError``: the round records the node as lost with the reason, and its next plan is a
reset from version 0).

What a method keeps on the client (``Method.keeps``: FedSA-LoRA's B) sits beside it as
``kept-r<round>.safetensors``, one file per round it trained in, the newest two only. A round
starts from the newest file of an *earlier* round, so a round redone after the ServerApp
restarted from its checkpoint starts where it started the first time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlora.filemode import as_umask
from fedlora.integrity import sha256

log = logging.getLogger(__name__)
FORMAT = 3  # 3: SHA-256 of the tensor file and of the JSON itself


class NodeStateError(RuntimeError):
    """The node's saved base failed its checksum; it was dropped and the server is asked for a reset."""

    MARKER = "node state reset requested"


def state_dir(root: Path, run_id: int | str, partition: int) -> Path:
    return Path(root) / f"run-{run_id}" / f"partition-{partition}"


def load_state(folder: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(version, D_v per layer) as saved, or (0, {}) when nothing was saved yet; ``NodeStateError`` if damaged."""
    index = folder / "state.json"
    if not index.is_file():
        return 0, {}
    problem = _damage(folder)
    if problem is not None:
        for f in [index, *folder.glob("base-v*.safetensors")]:  # never a silent wrong base: start again from W_0
            f.unlink(missing_ok=True)
        raise NodeStateError(f"{folder}: {problem}; the damaged base was dropped ({NodeStateError.MARKER})")
    meta = json.loads(index.read_text())
    tensors = load_file(folder / meta["file"]) if meta["file"] else {}
    return int(meta["version"]), {k.removeprefix("base/"): t for k, t in tensors.items()}


def _damage(folder: Path) -> str | None:
    try:
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return "state.json is not JSON"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"state.json has format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT}"
    body = {k: v for k, v in meta.items() if k != "json_sha256"}
    if _digest(body) != meta.get("json_sha256"):
        return "state.json does not match its SHA-256"
    if meta["file"] and (not (folder / meta["file"]).is_file() or sha256(folder / meta["file"]) != meta.get("sha256")):
        return f"{meta['file']} is missing or does not match its SHA-256"
    return None


def _digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


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
    meta = {"format": FORMAT, "version": version, "file": name, "sha256": sha256(folder / name) if name else None}
    tmp.write_text(json.dumps({**meta, "json_sha256": _digest(meta)}))
    os.replace(tmp, index)
    for old in folder.iterdir():
        if re.fullmatch(r"base-v\d+\.safetensors", old.name) and old.name != name:
            old.unlink()


_KEPT = re.compile(r"kept-r(\d+)\.safetensors")


def load_kept(folder: Path, before: int) -> dict[str, torch.Tensor] | None:
    """What the client kept after its newest intact round earlier than ``before`` (None: it never trained).

    A kept file that fails its checksum is dropped with a warning; the one before it (or nothing) is used.
    """
    rounds = sorted(int(m.group(1)) for p in folder.glob("kept-r*.safetensors") if (m := _KEPT.fullmatch(p.name)) and int(m.group(1)) < before)
    for r in reversed(rounds):
        path = folder / f"kept-r{r}.safetensors"
        sums = path.with_suffix(".sha256")
        if sums.is_file() and sums.read_text().split("  ")[0] == sha256(path):
            return load_file(path)
        log.warning("%s is missing its SHA-256 or does not match it: dropped, the client's earlier state is used", path)
        path.unlink()
        sums.unlink(missing_ok=True)
    return None


def save_kept(folder: Path, round: int, kept: dict[str, torch.Tensor]) -> None:
    """Store round ``round``'s kept tensors atomically with their SHA-256; keep this file and the newest earlier one."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"kept-r{round}.safetensors"
    tmp = folder / (final.name + ".tmp")
    save_file({k: t.detach().to("cpu").contiguous() for k, t in kept.items()}, str(tmp))
    as_umask(tmp)
    digest = sha256(tmp)
    os.replace(tmp, final)
    final.with_suffix(".sha256").write_text(f"{digest}  {final.name}\n")
    rounds = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _KEPT.fullmatch(p.name)))
    older = [r for r in rounds if r < round]
    for r in rounds:
        if r > round or (r < round and r != older[-1]):
            (folder / f"kept-r{r}.safetensors").unlink()
            (folder / f"kept-r{r}.sha256").unlink(missing_ok=True)
