"""Seeded fuzzing of the launcher's flags and of the folders ``fedlora deploy`` is pointed at (fast: nothing starts).

``fedlora.flower.launch.main`` checks everything (flags, config, node ranks, Ray's shares, the run folder and the
workdir, the locks) before ``_launch`` starts the first process; here ``_launch`` is replaced by a stub that only
records what it was given. Every case must end in exactly one of:

- refused: exit code 2, exactly one line on stderr, starting ``error:``, no traceback, and nothing written: every
  file and folder of the case's world (and of the current directory) as it was, no new folder anywhere in it;
- accepted: the stub reached, with a run folder and a workdir that exist, node ranks and shares it can take;
- nothing to do: ``--resume`` of a finished run, exit 0, one line, nothing written.

No child process is started by any case.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

import fedlora.flower.launch as launch
from tests.flower.conftest import TINY

NODES = 3  # configs/tiny.yaml: federation.num_clients


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under ``root``: a file's SHA-256, None for a folder; with its mode, so a chmod shows too."""
    out: dict[str, str | None] = {}
    for p in sorted(root.rglob("*")):
        mode = oct(p.lstat().st_mode)
        out[str(p.relative_to(root))] = f"{mode} {hashlib.sha256(p.read_bytes()).hexdigest()}" if p.is_file() else mode
    return out


class World:
    """One case's folders: a run to resume, a finished run, a folder of notes, an empty one, a file, a read-only parent."""

    def __init__(self, root: Path, config_text: str) -> None:
        self.root = root
        root.mkdir()
        self.run = root / "run"
        self.run.mkdir()
        (self.run / "config.yaml").write_text(config_text)
        (self.run / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n")
        self.done = root / "done"
        self.done.mkdir()
        (self.done / "config.yaml").write_text(config_text)
        (self.done / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(3)))
        (self.done / "summary.json").write_text("{}")
        self.notes = root / "notes"
        self.notes.mkdir()
        (self.notes / "notes.txt").write_text("mine")
        self.empty = root / "empty"
        self.empty.mkdir()
        self.file = root / "file.txt"
        self.file.write_text("a file")
        self.locked = root / "locked"  # a read-only folder: new folders inside it cannot be made
        self.locked.mkdir()
        self.locked.chmod(0o555)
        self.immutable = False
        if psutil.Process().uids().effective == 0 and shutil.which("chattr"):  # root ignores the mode: make it immutable too
            self.immutable = subprocess.run(["chattr", "+i", str(self.locked)], capture_output=True).returncode == 0

    @property
    def read_only(self) -> bool:
        return self.immutable or psutil.Process().uids().effective != 0

    def close(self) -> None:
        if self.immutable:
            subprocess.run(["chattr", "-i", str(self.locked)], check=True)
            self.immutable = False
        if self.locked.exists():
            self.locked.chmod(0o755)

    def folder(self, rng: random.Random) -> str:
        """A value for --output or --workdir: every kind of folder, and some that are no folder at all."""
        return str(rng.choice([
            self.root / "new", self.root / "a" / "b" / "c", self.run, self.done, self.notes, self.empty, self.file,
            self.file / "under", self.locked / "new", self.locked / "deep" / "er", Path("/proc/nope/run"), "relative/run", "",
            "-", "~nobody-such/x", self.root / ("x" * 300), self.run / "checkpoints",
        ]))


@pytest.fixture
def world(tmp_path, tiny_model, monkeypatch):
    from fedlora.config import load_config, to_yaml

    monkeypatch.chdir(tmp_path)  # a relative folder lands in the snapshot
    worlds: list[World] = []

    def make(name: str) -> World:
        worlds.append(World(tmp_path / name, to_yaml(load_config(TINY, [f"model.path={tiny_model}"]))))
        return worlds[-1]

    yield make
    for w in worlds:
        w.close()


@pytest.fixture
def stub(monkeypatch):
    """``_launch`` replaced: what it would have launched, and exit code 0."""
    calls: list[dict] = []

    def fake(args, cfg, config, nodes, ranks, simulation, output, workdir, command):  # noqa: ANN001, ANN202
        calls.append({"args": args, "nodes": nodes, "ranks": ranks, "simulation": simulation, "output": output, "workdir": workdir,
                      "folders": output.is_dir() and workdir.is_dir(), "entries": sorted(p.name for p in output.iterdir())})
        return 0

    monkeypatch.setattr(launch, "_launch", fake)
    return calls


def call(argv: list[str]) -> int:
    try:
        return launch.main(argv)
    except SystemExit as e:  # argparse: a flag it cannot parse
        return int(e.code)


def assert_outcome(rc: int, out: str, err: str, calls: list[dict], before: dict, after: dict, argv: list[str]) -> str:
    """Refused in one line with nothing written, accepted (the stub reached), or a finished run left alone."""
    assert "Traceback" not in out + err, (argv, err[-3000:])
    if rc == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert not calls, argv
        assert after == before, (argv, lines[0], {k: (before.get(k), after.get(k)) for k in set(before) ^ set(after) | {k for k in before if after.get(k) != before[k]}})
        return "refused"
    assert rc == 0, (argv, rc, err)
    if not calls:  # --resume of a finished run
        assert "nothing to resume, nothing changed" in out and after == before, (argv, out)
        return "finished"
    (c,) = calls
    assert c["folders"], argv  # the run folder and the workdir exist when the launch would start
    given = dict(g for g in _groups(argv) if len(g) == 2)  # each flag as given (the last one wins, as argparse takes it)
    if "--nodes" in given:
        assert int(given["--nodes"]) == c["nodes"], argv  # --nodes 0 is not "the default"
    if "--resume" in given:
        assert c["args"].resume and c["output"] == Path(given["--resume"]).expanduser().resolve(), argv
    elif given.get("--output"):
        assert c["output"] == Path(given["--output"]).expanduser().resolve(), argv
    if "--simulation" not in argv:
        assert "--client-cpus" not in given and "--client-gpus" not in given, argv  # never silently ignored
    assert all(0 <= k < c["nodes"] and v["rank"] >= 1 for k, v in c["ranks"].items()), argv
    if c["simulation"] is not None:
        assert c["simulation"].cpus >= 1 and c["simulation"].cpus == int(c["simulation"].cpus) and c["simulation"].gpus >= 0, argv
        assert not (c["args"].tls or c["args"].auth or c["ranks"]), argv
    if not c["args"].resume:  # a new run starts in an empty folder; one that recorded nothing leaves no folder it made
        assert c["entries"] == [], (argv, c["entries"])
    return "accepted"


NODE_RANKS = ["0=1", "1=2", "2=4", "0=3", "2=1", "0=abc", "5", "7=2", "1=0", "-1=2", "1=2=3", "=", "1=", "=2", " 1=2", "0x1=2",
              "1=99", "0=4", "1=-3", "3=1", "2=1.5", "1 = 2", "9" * 25 + "=1", "1=" + "9" * 25, "١=٢"]
NUMBERS = ["0", "1", "2", "3", "4", "-1", "0.5", "1.5", "1e3", "nan", "inf", "-inf", "abc", "", "9" * 25, "0x10", " 2", "2.0"]
GPUS = ["0", "0.5", "1", "2", "0.0001", "0.001", "-1", "nan", "inf", "abc", "1.5", "0.999", ""]


def random_argv(rng: random.Random, w: World, tiny_model: Path) -> list[str]:
    """Flags with malformed values, or (one case in three) well-typed ones, so that both outcomes come up often."""
    good = rng.random() < 0.35

    def pick(bad: list[str], fine: list[str]) -> str:
        return rng.choice(fine if good else bad + fine)

    argv: list[str] = []
    resume = rng.random() < 0.2
    if resume:
        argv += ["--resume", str(pick([w.notes, w.empty, w.file, w.root / "nowhere", w.run / "config.yaml", "", "-x", w.root / ("x" * 300)],
                                      [w.run, w.done]))]
    else:
        argv += ["--config", str(pick([w.file, w.root / ("x" * 300), w.notes, ""], [TINY] * 4)), f"model.path={tiny_model}"]
    simulation = rng.random() < 0.35
    if simulation:
        argv.append("--simulation")
    if rng.random() < 0.6:
        argv += ["--output", w.folder(rng) if not good else str(rng.choice([w.root / "new", w.root / "a" / "b" / "c", w.empty, "relative/run"]))]
    elif rng.random() < 0.3:
        argv.append(f"output.dir={w.folder(rng)}")
    if rng.random() < 0.3:
        argv += ["--workdir", w.folder(rng) if not good else str(rng.choice([w.root / "new-work", w.empty]))]
    if rng.random() < 0.3:
        argv += ["--nodes", pick(NUMBERS, ["3"])]
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3]) if not (good and simulation) else 0):
        argv += ["--node-rank", pick(NODE_RANKS, [f"{k}={r}" for k in range(NODES) for r in (1, 2, 4)])]
    if rng.random() < (0.6 if simulation else 0.15 * (not good)):
        argv += ["--client-cpus", pick(NUMBERS, ["1", "2", "1.0"])]
    if rng.random() < (0.4 if simulation else 0.1 * (not good)):
        argv += ["--client-gpus", pick(GPUS, ["0", "0.0"])]
    for flag in ("--tls", "--auth"):
        if rng.random() < 0.2 * (not (good and simulation)):
            argv.append(flag)
    for flag in ("--threads-per-node", "--server-threads"):
        if rng.random() < 0.1:
            argv += [flag, pick(NUMBERS, ["1", "2"])]
    if rng.random() < 0.1 * (not good):
        argv.append(rng.choice(["federation.rounds=5", "lora.ranks=[4,2]", "federation.method=fedit", "output.save_final=false", "nope=1"]))
    if rng.random() < 0.05 * (not good):
        argv.append(rng.choice(["--bogus", "--nodes", "--output"]))  # an unknown flag, a flag without its value
    rng.shuffle(flag_groups := _groups(argv))
    return [x for g in flag_groups for x in g]


def _groups(argv: list[str]) -> list[list[str]]:
    """argv as flag groups (a flag with its value), so shuffling keeps each value after its flag."""
    takes = {"--resume", "--config", "--output", "--workdir", "--nodes", "--node-rank", "--client-cpus", "--client-gpus",
             "--threads-per-node", "--server-threads"}
    groups, i = [], 0
    while i < len(argv):
        n = 2 if argv[i] in takes and i + 1 < len(argv) else 1
        groups.append(argv[i:i + n])
        i += n
    return groups


@pytest.mark.parametrize("block", range(4))
def test_random_launcher_flags_are_refused_in_one_line_or_accepted_and_start_nothing(world, stub, tiny_model, tmp_path, capfd, block):
    rng = random.Random(4100 + block)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    seen: dict[str, int] = {}
    for case in range(40):
        w = world(f"w{block}-{case}")
        argv = random_argv(rng, w, tiny_model)
        stub.clear()
        before = snapshot(tmp_path)
        rc = call(argv)
        captured = capfd.readouterr()
        outcome = assert_outcome(rc, captured.out, captured.err, stub, before, snapshot(tmp_path) if rc != 0 or not stub else before, argv)
        seen[outcome] = seen.get(outcome, 0) + 1
        w.close()
        shutil.rmtree(w.root)
        for leftover in ("new", "a", "relative", ".new.flower", ".c.flower", ".run.flower", "runs"):  # what an accepted case made
            shutil.rmtree(tmp_path / leftover, ignore_errors=True)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children, "a case started a process"
    print(f"\nblock {block}: {seen}")
    assert seen.get("refused", 0) >= 10 and seen.get("accepted", 0) >= 5, seen  # both outcomes are exercised


def test_deploys_output_folder_cases(world, stub, tiny_model, capfd):
    """``fedlora deploy`` on each kind of folder: a run, a finished run, a folder of other files, a file, a folder under
    a file, a read-only parent (refused, nothing written), an empty or new folder (accepted), and with ``--resume``."""
    from fedlora.cli import main as cli

    w = world("w")
    base = ["deploy", str(TINY), f"model.path={tiny_model}"]
    cases = [
        (["--output", str(w.run)], "refused", "holds a run (accepted: a new or empty folder, or --resume"),
        ([f"output.dir={w.run}"], "refused", "holds a run"),
        (["--output", str(w.done)], "refused", "holds a run"),
        (["--output", str(w.notes)], "refused", "already holds files, e.g. notes.txt"),
        (["--output", str(w.file)], "refused", "cannot create"),
        (["--output", str(w.file / "under")], "refused", "cannot create"),
        *([(["--output", str(w.locked / "new" / "run")], "refused", "cannot create")] if w.read_only else []),
        (["--output", str(w.root / "fresh"), "--workdir", str(w.file / "w")], "refused", "--workdir: cannot create"),  # the run folder it made goes again
        (["--output", str(w.root / "fresh"), "--workdir", str(w.locked / "w")], "refused" if w.read_only else "accepted", "--workdir: cannot create"),
        (["--output", str(w.root / ("x" * 300))], "refused", "File name too long"),
        (["--output", str(w.empty)], "accepted", ""),
        (["--output", str(w.root / "new" / "deeper")], "accepted", ""),
        (["--resume", str(w.run)], "accepted", ""),
        (["--resume", str(w.done)], "finished", "is finished (round 2 of 2): nothing to resume"),
        (["--resume", str(w.notes)], "refused", "holds no config.yaml"),
        (["--resume", str(w.file)], "refused", "holds no config.yaml"),
        (["--resume", str(w.root / ("x" * 300))], "refused", "holds no config.yaml"),
        (["--resume", ""], "refused", "holds no config.yaml"),  # the current folder, not a new run with the default config
        (["--resume", str(w.done), "federation.rounds=3"], "refused", "federation.rounds=3 differs from 2"),
    ]
    for extra, want, says in cases:
        argv = (["deploy"] if "--resume" in extra else base) + extra
        stub.clear()
        before = snapshot(w.root)
        rc = cli(argv)
        captured = capfd.readouterr()
        after = snapshot(w.root)
        got = assert_outcome(rc, captured.out, captured.err, stub, before, after if rc != 0 or not stub else before, argv)
        assert got == want and says in captured.out + captured.err, (argv, got, captured.out + captured.err)
        if got == "accepted" and "--resume" not in extra:  # a new run that recorded nothing: its folder (and parents) went again
            assert not stub[0]["output"].exists() or stub[0]["output"] == w.empty, argv
        for made in (w.root / ".empty.flower", w.root / ".fresh.flower", w.root / "new", w.root / ".run.flower", w.root / "fresh"):
            shutil.rmtree(made, ignore_errors=True)
