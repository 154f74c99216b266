"""Seeded fuzzing of what a user hands the command line: random settings, damaged data files, damaged checkpoints.

Every case must end in success or exactly one ``error:`` line, never a traceback, and must leave
an existing run folder as it was (a resume that succeeds is that run's own command and may
finish it). Runs use a tiny random Llama (hidden 32), so a case that trains takes about a second.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.config_reference import rows
from fedlora.methods import REGISTRY
from tests.tiny_folder import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["rounds", "local_steps", "num_clients", "max_examples", "batch_size", "max_length", "every", "min_size", "classes_per_client"]
"""Settings that size the work: fuzzed with small and malformed values only, so no case runs for long."""
SMALL_VALUES = ["0", "-1", "1", "2", "3", "1.5", "abc", "[]", "[1]", "", "true", "{a: 1}", "-0", "0x10", "9" * 25]
VALUES = ["", "0", "-1", "1", "2", "0.5", "1e30", "-1e-30", "1e-300", "inf", "-inf", ".nan", "nan", "[]", "[0]", "[1,2]", "[4,2,1]",
          "[a,b]", "{}", "{a: 1}", "null", "true", "no", "abc", "'  '", "\u00e9t\u00e9 \U0001f600", "x" * 300, "9" * 25, "q_proj",
          "[q_proj,nope]", "/nonexistent/x", "/proc/nope", "cuda", "cpu", "bfloat16", "float16", "auto", "iid", "natural",
          "pathological", "quantity", "chatterbot", "uniform", "data", "${HOME}", "--resume", "key=value"]
BASE = ["federation.rounds=1", "train.local_steps=1", "data.max_examples=30", "eval.max_examples=4", "output.save_final=false"]


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_outcome(rc: int, err: str) -> None:
    """Success, or one clear line: never a traceback."""
    assert "Traceback" not in err, err[-3000:]
    if rc != 0:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1, f"rc {rc}\n{err[-3000:]}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", TINY, f"model.path={model_dir}", f"output.dir={out}", *BASE]) == 0
    return out


def plausible(kind: str, default: str, rng: random.Random) -> str:
    """A value of the setting's own type (from the reference's type column), so that about half the cases run."""
    if choices := re.findall(r"`([^`]+)`", kind):
        return rng.choice(choices)
    if kind.startswith("int"):
        return str(rng.choice([0, 1, 2, 3, 7]))
    if kind.startswith("float"):
        return str(rng.choice([0.0, 0.01, 0.1, 0.5, 0.9, 1.0, 2.0]))
    if kind.startswith("bool"):
        return rng.choice(["true", "false"])
    return default.strip("`") if default != "null" else "null"


def random_override(rng: random.Random, keys: list[str]) -> str:
    key = rng.choice(keys)
    if rng.random() < 0.5 and key not in ("federation.options", "model.device"):
        kind, default = next((k, d) for name, k, d, *_ in rows() if name == key)
        return f"{key}={plausible(kind, default, rng)}"
    if key == "federation.method":
        return f"{key}={rng.choice([*REGISTRY, *VALUES[:8]])}"
    if key == "federation.options":
        key = f"federation.options.{rng.choice(['weights', 'scaling', 'energy', 'select', 'nope', 'rank'])}"
    if key.rsplit(".", 1)[-1] in SMALL:
        return f"{key}={rng.choice(SMALL_VALUES)}"
    return f"{key}={rng.choice(VALUES)}"


@pytest.mark.parametrize("block", range(4))
def test_random_settings_end_in_success_or_one_line_and_never_touch_a_run(model_dir, finished_run, tmp_path, capfd, monkeypatch, block):
    monkeypatch.chdir(tmp_path)  # a relative path a case writes lands here
    rng = random.Random(2026 + block)
    keys = [k for k, *_ in rows() if k not in ("model.path", "data.source", "output.dir", "output.trackers")]  # chosen below; trackers: tests/test_trackers.py
    before = folder_digest(finished_run)
    for case in range(40):
        overrides = [random_override(rng, keys) for _ in range(rng.choice([1, 1, 1, 2, 2, 3]))]
        out = finished_run if rng.random() < 0.05 else tmp_path / f"run-{case}"  # now and then: aim at a finished run
        if rng.random() < 0.1:
            overrides.append(f"data.source={rng.choice(['/nonexistent/d.jsonl', str(tmp_path), str(ROOT / 'README.md')])}")
        rc = main(["run", TINY, f"model.path={model_dir}", *BASE, f"output.dir={out}", *overrides])
        err = capfd.readouterr().err
        one_outcome(rc, err)
        if rc == 0:
            assert (out / "summary.json").is_file(), overrides
        assert folder_digest(finished_run) == before, (overrides, "changed a finished run")


def damage(data: bytes, rng: random.Random) -> bytes:
    """One of the ways a file goes bad: flipped, cut, spliced, emptied, re-encoded, or replaced by noise."""
    kind = rng.choice(["flip", "truncate", "insert", "empty", "latin1", "utf16", "noise", "dup_line", "nul", "letter", "letter", "drop_line"])
    n = len(data)
    if kind == "letter":  # a changed letter keeps the file well-formed: the damage a checksum, not a parser, finds
        spots = [i for i, b in enumerate(data) if chr(b).isalpha()]
        if spots:
            i = rng.choice(spots)
            return data[:i] + bytes([ord("a") + (data[i] - ord("a") + 1) % 26 if chr(data[i]).islower() else ord("x")]) + data[i + 1:]
    if kind == "drop_line":
        lines = data.splitlines(keepends=True)
        return b"".join(x for x in lines if rng.random() < 0.7)
    if kind == "flip" and n:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == "truncate":
        return data[: rng.randrange(max(1, n))]
    if kind == "insert":
        i = rng.randrange(n + 1)
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[i:]
    if kind == "empty":
        return b""
    if kind == "latin1":
        return data.decode("utf-8", "replace").replace("e", "\u00e9").encode("latin-1", "replace")
    if kind == "utf16":
        return data.decode("utf-8", "replace").encode("utf-16")
    if kind == "noise":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 2048)))
    if kind == "nul":
        return data.replace(b",", b"\x00", rng.randint(1, 5))
    lines = data.splitlines(keepends=True)
    return b"".join(lines + lines[: rng.randint(0, len(lines))]) if lines else data


def test_damaged_data_files_end_in_success_or_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(7)
    rows_ = [{"instruction": f"Question {i} about {t}?", "context": "", "response": f"Answer {i}.", "category": t}
             for i, t in enumerate(["art", "law", "sea", "sky"] * 15)]
    clean = ("\n".join(json.dumps(r) for r in rows_) + "\n").encode()
    csv = ("instruction,response,category\n" + "".join(f"Q{i},A{i},{'ab'[i % 2]}\n" for i in range(60))).encode()
    outcomes = []
    for case in range(60):
        suffix, data = (".jsonl", clean) if case % 3 else (".csv", csv)
        path = tmp_path / f"d{case}{suffix}"
        path.write_bytes(damage(data, rng))
        rc = main(["data", TINY, f"data.source={path}", "data.max_examples=null", "federation.num_clients=3", f"output.dir={tmp_path / f'out-{case}'}"])
        one_outcome(rc, capfd.readouterr().err)
        assert rc != 0 or (tmp_path / f"out-{case}" / "partition.json").is_file()  # a file that loaded was dealt to clients
        outcomes.append(rc)
    assert {0, 2} <= set(outcomes)  # the damage both spares files and breaks them: each outcome is exercised


def test_damaged_checkpoints_resume_from_an_intact_one_or_stop_in_one_line(model_dir, tmp_path, capfd):
    """A run killed in round 3 of 3 (checkpoints of rounds 1 and 2 on disk), its checkpoint files damaged at random."""
    rng = random.Random(11)
    run = tmp_path / "interrupted"
    assert main(["run", TINY, f"model.path={model_dir}", f"output.dir={run}", *BASE, "federation.rounds=2"]) == 0
    capfd.readouterr()
    (run / "summary.json").unlink()
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("rounds: 2\n", "rounds: 3\n"))  # what a kill in round 3 of 3 leaves
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    for case in range(16):
        copy = tmp_path / f"case-{case}"
        shutil.copytree(run, copy)
        newest, *older = sorted((copy / "checkpoints").glob("round-*"), reverse=True)
        victims = sorted(newest.glob("state.*")) + (sorted(older[0].glob("state.*")) if older and rng.random() < 0.25 else [])
        for victim in rng.sample(victims, rng.randint(1, len(victims))):
            victim.write_bytes(damage(victim.read_bytes(), rng)) if rng.random() < 0.85 else victim.unlink()
        damaged = folder_digest(copy)
        rc = main(["run", "--resume", str(copy)])
        one_outcome(rc, capfd.readouterr().err)
        if rc == 0:
            assert [json.loads(x)["round"] for x in (copy / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
        else:
            assert folder_digest(copy) == damaged  # refused: nothing written
