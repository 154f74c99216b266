"""A checkpoint after every round, written atomically, and the resume that reads it back.

``RUN_DIR/checkpoints/round-<t>/`` holds ``state.safetensors`` (every tensor) and
``state.json`` (the skeleton that places them, the round, the RNG states, how many lines of
metrics.jsonl it covers). Contents: the method's state (``methods/state.py``; a merging method's
base in bounded form), the FedAvg'd task heads, the torch, Python and NumPy global RNG states.
Nothing in it grows with the number of rounds (methods.md §4): the metrics stay in metrics.jsonl,
and the model's merged base is rebuilt from the method's state on resume, bit for bit.
Both files are written in a temporary folder, fsynced, and the folder is renamed into place,
so a process killed at any point leaves either the complete checkpoint or none; the newest
``round-<t>`` folder is the one to resume from, and only the last ``KEEP`` are kept.

A checkpoint verifies itself: ``state.json`` holds the SHA-256 of ``state.safetensors`` and of
its own content. A
resume checks the newest checkpoint first; a damaged one (a file missing, truncated, or a byte
changed) is named in one warning line and the one before is used; with none intact the resume
stops with one line before anything in the run folder changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedlora.filemode import as_umask
from fedlora.methods.state import pack, unpack

if TYPE_CHECKING:
    from fedlora.app.run_dir import RunDir
    from fedlora.federation.server import Server
    from fedlora.sim.federation import Simulation

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """No checkpoint a run can resume from; nothing in the run folder was changed."""

FORMAT = 3  # 3: state.json carries the SHA-256 of itself as well as of state.safetensors
KEEP = 2
_NAME = re.compile(r"round-(\d+)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(keys.astype(np.int64))}
    return tensors, {"python": [version, list(mt), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def save(folder: Path, server: Server, round: int, lines: int, last: dict[str, Any]) -> Path:
    """Write ``folder/round-<t>`` atomically; drop older checkpoints beyond the last ``KEEP``.

    ``lines``: how many entries of metrics.jsonl the checkpoint covers; ``last``: the newest one.
    """
    from fedlora.app.run_dir import clean_json

    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(server.state(), tensors)
    rng_tensors, rng = _rng_state()
    tensors.update(rng_tensors)
    meta = {"format": FORMAT, "round": round, "method": server.method.name, "state": skeleton, "rng": rng,
            "metrics_lines": lines, "last": clean_json(last)}

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"round-{round:04d}"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "state.safetensors"))
    as_umask(tmp / "state.safetensors")
    _fsync(tmp / "state.safetensors")
    meta["sha256"] = sha256(tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps({**meta, "json_sha256": _json_digest(meta)}))
    _fsync(tmp / "state.json")
    _fsync(tmp)
    if final.exists():  # a round redone after a resume from an older checkpoint
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(folder)
    for old in complete(folder)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".round-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def complete(folder: Path) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest first (a half-written one never has this name)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the skeleton itself: a changed byte that leaves it valid JSON is caught too."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def damage(path: Path) -> str | None:
    """Why the checkpoint in ``path`` cannot be trusted (one phrase), or None when it is intact."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"state.json unreadable ({type(e).__name__})"
    if isinstance(meta, dict) and meta.get("format") == 2:
        return "written by an older fedlora (checkpoint format 2, without its own checksum): resume it with that version"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "sha256" not in meta or "json_sha256" not in meta:
        return f"state.json is not a format-{FORMAT} checkpoint with its checksums"
    if _json_digest({k: v for k, v in meta.items() if k != "json_sha256"}) != meta["json_sha256"]:
        return "state.json does not match its SHA-256"
    tensors = path / "state.safetensors"
    if not tensors.is_file():
        return "state.safetensors missing"
    if sha256(tensors) != meta["sha256"]:
        return "state.safetensors does not match its SHA-256"
    return None


def load(path: Path, server: Server, recorded: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Restore a checkpoint into a freshly prepared server; the lines of ``recorded`` (metrics.jsonl) it covers."""
    if (why := damage(path)) is not None:
        raise CheckpointError(f"--resume: {path} is damaged: {why}")
    meta = json.loads((path / "state.json").read_text())
    if meta["method"] != server.method.name:
        raise CheckpointError(f"--resume: {path} is a checkpoint of method {meta['method']!r}, not {server.method.name!r} (accepted: the run's own method)")
    tensors = load_file(str(path / "state.safetensors"))
    count = int(meta["metrics_lines"])
    done = recorded[:count]
    if len(done) != count or [e.get("round") for e in done] != list(range(count)):
        raise CheckpointError(f"--resume: metrics.jsonl holds rounds {[e.get('round') for e in recorded][:20]}, the checkpoint {path.name} needs rounds 0..{count - 1}")
    server.load(unpack(meta["state"], tensors))
    _set_rng_state(tensors, meta["rng"])
    return done


def newest_intact(folder: Path) -> Path | None:
    """The newest checkpoint that passes ``damage``; each damaged newer one is named in a warning."""
    found = complete(folder)
    for path in reversed(found):
        if (why := damage(path)) is None:
            return path
        log.warning("checkpoint %s is damaged (%s); trying the one before it", path, why)
    if found:
        raise CheckpointError(f"--resume: no intact checkpoint in {folder} ({len(found)} damaged); nothing was changed")
    return None


def resume(run: RunDir, server: Server) -> list[dict[str, Any]]:
    """Load the newest intact checkpoint of ``run`` and cut metrics.jsonl back to it; the entries kept.

    Without any checkpoint a run that recorded nothing starts afresh; one that recorded rounds stops with one line.
    """
    recorded = run.read_metrics() if run.metrics.is_file() else []
    path = newest_intact(run.checkpoints)
    if path is None and recorded:
        raise CheckpointError(f"--resume: {run.checkpoints} holds no checkpoint, but metrics.jsonl records {len(recorded)} rounds "
                              "(accepted: a run folder with its checkpoints/round-*); nothing was changed")
    done = load(path, server, recorded) if path is not None else []
    run.rewrite_metrics(done)  # lines of rounds after the checkpoint are redone
    log.info("resuming %s after round %s", run.path, done[-1]["round"] if done else "none (no complete checkpoint)")
    return done


def run_with_checkpoints(sim: Simulation, run: RunDir, resume_run: bool = False) -> None:
    """The simulation with a checkpoint after every round; ``resume_run``: from the newest complete one."""
    done = resume(run, sim.server) if resume_run else None
    sim.run(run.record, checkpoint=lambda entry, lines: save(run.checkpoints, sim.server, entry["round"], lines, entry), done=done)
