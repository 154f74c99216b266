"""The kill sweep: ``fedlora deploy`` and ``fedlora simulate`` SIGKILLed piece by piece at named points, then resumed.

Targets: the ServerApp, the SuperLink, one SuperNode (partition 1's), the launcher, and all of them together (the
ServerApp, the SuperLink, every SuperNode and the launcher at once); on Flower's simulation runtime (Ray) the
ServerApp's side (the ``flwr-simulation`` process, which also drives Ray), the launcher, and both with the SuperLink.
Points: round 0 (recorded and checkpointed, round 1 not yet planned), mid-round (round 2: partition 1's ClientApp
holds its plan and has not trained), during a checkpoint write (round 1's tensors written in the hidden temporary
folder, ``state.json`` not yet) and during the final save (the adapter's weights written, its card and checksums not).

The points are hit exactly: a test-only ``sitecustomize`` (``tests/flower/sweep_site``, on ``PYTHONPATH`` for the
swept deployment alone) wraps production functions as they are imported and stops the first process that gets
there until the test has killed its target. Every case then checks:

- no process of the deployment is left once its launcher has ended (each carries this case's tag in its
  environment; and none runs in, or names, the run folder or the workdir);
- the run folder is intact: every complete checkpoint verifies, ``metrics.jsonl`` parses and holds the lines its
  newest checkpoint counts, ``final/`` is absent or sealed and verified, and every node's saved base verifies;
- the outcome: ``--resume`` ends bit-identical to an uninterrupted run (every metrics line without its wall time,
  the final adapter, the summary's numbers: the in-process simulator's run, which a Flower run equals bit for bit
  with one torch thread everywhere), or the case says in one line why it cannot (a SuperNode killed before its last
  update: the run goes on without that client, as a federation does, and the launcher says so in one line).

Marked ``sweep`` (and ``slow``): pyproject's addopts leave it out of ``make test``; run it with
``pytest -m sweep tests/flower/test_kill_sweep.py`` (1–3 minutes a case on 2 cores; docs/reliability.md has the table).
``FEDLORA_SWEEP_REPORT=<file>`` appends one JSON line per case (outcome and times) to that file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from fedlora.flower.settings import ENV
from tests.flower.conftest import FAST, ROOT, TINY, as_in, read_metrics

pytestmark = [pytest.mark.sweep, pytest.mark.slow]

SITE = Path(__file__).resolve().parent / "sweep_site"
OVERRIDES = [*FAST, "train.lr=0.05"]  # 2 rounds of flora on 3 clients; a learning rate that moves the adapter
POINTS = {"round0": "round0:1", "mid-round": "mid-round:2", "checkpoint": "checkpoint:1", "final": "final:0"}
DEPLOY_TARGETS = ["serverapp", "superlink", "supernode", "launcher", "all"]
SIMULATE_TARGETS = ["serverapp", "launcher", "all"]
CASES = [("deploy", t, p) for t in DEPLOY_TARGETS for p in POINTS] + [("simulate", t, p) for t in SIMULATE_TARGETS for p in POINTS]
LOST = {("deploy", "supernode", p) for p in ("round0", "mid-round", "checkpoint")}
"""Cases that cannot end as the uninterrupted run: the SuperNode of partition 1 dies before its last update, and the
run goes on without it (recorded under ``lost``), as a federation does when a client fails."""


def _env(tag: Path, point: str | None = None) -> dict[str, str]:
    """The swept deployment's environment: one torch thread everywhere (as the reference), the case's tag, the kill point."""
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200", "FEDLORA_SWEEP_TAG": str(tag),
           "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("FEDLORA_SWEEP", None)
    if point is not None:
        env.update({"FEDLORA_SWEEP": POINTS[point], "FEDLORA_SWEEP_DIR": str(tag)})
    return env


def _args(transport: str, run: Path, model: Path) -> list[str]:
    extra = ["--client-cpus", "1"] if transport == "simulate" else []
    return [transport, str(TINY), *extra, *OVERRIDES, f"model.path={model}", "--output", str(run)]


# ---- the processes of one case, found by its tag (never by name) ---------------------------------------------------


def _proc(pid: int) -> dict[str, Any] | None:
    """pid's command line, cwd and environment tag; None for one that is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                return None
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return None
    return {"pid": pid, "cmd": cmd, "cwd": cwd, "tag": env.get(b"FEDLORA_SWEEP_TAG", b"").decode()}


def _processes(tag: Path, roots: list[Path]) -> list[dict[str, Any]]:
    """Live processes that carry ``tag`` or run in (or name) one of ``roots``, this test's process aside."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid() and (p := _proc(int(entry.name))) is not None:
            if p["tag"] == str(tag) or any(p["cwd"].startswith(str(r)) or str(r) in p["cmd"] for r in roots):
                found.append(p)
    return found


def _targets(target: str, transport: str, tag: Path, launcher: subprocess.Popen) -> list[int]:
    """The pids to SIGKILL for ``target``, among this case's own processes."""
    mine = [p for p in _processes(tag, []) if p["tag"] == str(tag)]

    server = "flwr-simulation" if transport == "simulate" else "flwr-serverapp"
    pick = {
        "serverapp": lambda: _of(mine, server),
        "superlink": lambda: _of(mine, "flower-superlink"),
        "supernode": lambda: _of(mine, "flower-supernode", "partition-id=1 "),
        "launcher": lambda: [launcher.pid],
    }
    if target == "all":
        parts = ["serverapp", "superlink"] + (["supernodes"] if transport == "deploy" else [])
        pids = [pid for part in parts for pid in (_of(mine, "flower-supernode") if part == "supernodes" else pick[part]())]
        return pids + [launcher.pid]
    return pick[target]()


def _is(cmd: str, program: str) -> bool:
    """Whether the command line runs ``program`` (a Python entry point: the script is the first or second word)."""
    words = cmd.split()
    return any(Path(w).name == program for w in words[:2])


def _of(procs: list[dict[str, Any]], program: str, also: str = "") -> list[int]:
    found = [p["pid"] for p in procs if _is(p["cmd"], program) and also in p["cmd"] + " "]
    assert found, f"no {program} {also} among the case's processes: {[p['cmd'][:120] for p in procs]}"
    return found


def _wait(what: str, check, timeout: float, launcher: subprocess.Popen | None = None, out: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if launcher is not None and launcher.poll() is not None:
            raise AssertionError(f"the launcher ended (rc {launcher.returncode}) before {what}:\n{out.read_text()[-4000:] if out else ''}")
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)


def _left(tag: Path, roots: list[Path], timeout: float) -> list[str]:
    """What of the case is still running after ``timeout`` seconds (nothing, we hope)."""
    deadline = time.monotonic() + timeout
    while (left := _processes(tag, roots)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [f"{p['pid']} {p['cmd'][:200]} (cwd {p['cwd']})" for p in left]


def _cleanup(tag: Path, roots: list[Path]) -> None:
    """After a failure: this case's own processes, by its tag."""
    for p in _processes(tag, roots):
        if p["tag"] == str(tag):
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- what a killed run folder must still be ---------------------------------------------------------------------------


def assert_intact(run: Path, workdir: Path) -> dict[str, Any]:
    """Every complete checkpoint verifies and fits metrics.jsonl; final/ is absent or sealed; every node base verifies."""
    from fedlora.app import checkpoint
    from fedlora.flower.state import _damage
    from fedlora.integrity import damage, sealed

    lines = read_metrics(run) if (run / "metrics.jsonl").is_file() else []  # every line parses
    assert [m["round"] for m in lines] == list(range(len(lines))), [m["round"] for m in lines]
    found = checkpoint.complete(run / "checkpoints")
    for path in found:
        assert checkpoint.damage(path) is None, f"{path}: {checkpoint.damage(path)}"
    if found:
        covers = json.loads((found[-1] / "state.json").read_text())["metrics_lines"]
        assert covers <= len(lines), f"{found[-1].name} covers {covers} lines, metrics.jsonl holds {len(lines)}"
    elif lines:
        raise AssertionError(f"metrics.jsonl holds {len(lines)} lines and no checkpoint is complete")
    if (run / "final").exists():
        assert sealed(run / "final") and damage(run / "final") is None, f"final/ is half-written: {sorted(p.name for p in (run / 'final').iterdir())}"
    nodes = [p.parent for p in workdir.glob("**/partition-*/state.json")]
    for folder in nodes:
        assert _damage(folder) is None, f"{folder}: {_damage(folder)}"
    return {"lines": len(lines), "checkpoints": [p.name for p in found], "nodes": len(nodes)}


def assert_same_as(run: Path, ref: Path) -> None:
    """Every metrics line (bar times) and the final adapter equal the uninterrupted run's, bit for bit."""
    got, want = read_metrics(run), read_metrics(ref)
    assert [m["round"] for m in got] == [m["round"] for m in want]
    for g, w in zip(got, want, strict=True):
        assert as_in(g, w) == as_in(w, w), f"round {w['round']}"
    a, b = load_file(run / "final" / "adapter_model.safetensors"), load_file(ref / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in b)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    for key in ("rounds", "global_loss", "client_loss", "bytes_up", "bytes_down", "agg_noise_mean", "init_noise_mean"):
        assert sa[key] == sb[key], key


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """The uninterrupted run: ``fedlora run`` in a process of its own, one torch thread (deploy and Ray equal it bit for bit)."""
    ref = tmp_path_factory.mktemp("reference") / "run"
    env = {**_env(ref), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", "run", str(TINY), *OVERRIDES, f"model.path={tiny_model}", f"output.dir={ref}"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (ref / "final" / "adapter_model.safetensors").is_file()
    return ref


def _report(row: dict[str, Any]) -> None:
    print("\nSWEEP " + json.dumps(row))
    if path := os.environ.get("FEDLORA_SWEEP_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(("transport", "target", "point"), CASES, ids=[f"{t}-{g}-{p}" for t, g, p in CASES])
def test_kill_sweep(transport, target, point, tiny_model, reference, tmp_path):
    if transport == "simulate":
        pytest.importorskip("ray", reason="Flower's simulation runtime needs Ray: pip install -e \".[simulation]\"")
    run, workdir, tag = tmp_path / "run", tmp_path / ".run.flower", tmp_path / "kill"
    tag.mkdir()
    roots = [run, workdir]
    out = tmp_path / "first.out"
    t0 = time.monotonic()
    with open(out, "wb") as f:
        launcher = subprocess.Popen([sys.executable, "-m", "fedlora.cli", *_args(transport, run, tiny_model)], cwd=ROOT, env=_env(tag, point),
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # 1. the point, then the target, SIGKILLed
        _wait(f"kill point {POINTS[point]}", (tag / "reached").is_file, 900, launcher, out)
        reached = json.loads((tag / "reached").read_text())
        pids = _targets(target, transport, tag, launcher)
        t_kill = time.monotonic()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if target not in ("launcher", "all"):  # the rest of the deployment goes on from the point, without its target
            time.sleep(1)
            (tag / "release").touch()
        rc = launcher.wait(900)
        t_end = time.monotonic()
        said = out.read_text()
        left = _left(tag, roots, 60)
        t_clean = time.monotonic()
        assert left == [], "processes of the killed deployment left behind:\n" + "\n".join(left)

        # 2. what the launcher said: nothing (it was killed), one error line, or a finished run
        assert "Traceback" not in said, said[-4000:]
        if target in ("launcher", "all"):
            assert rc == -signal.SIGKILL, (rc, said[-3000:])
        elif rc != 0:
            assert rc == 1 and len(_errors(said)) == 1, (rc, said[-3000:])
        state = assert_intact(run, workdir)

        # 3. the outcome: resumed bit-identical, or one line saying why it cannot
        again = subprocess.run([sys.executable, "-m", "fedlora.cli", transport, "--resume", str(run), *(["--client-cpus", "1"] if transport == "simulate" else [])],
                               cwd=ROOT, env=_env(tmp_path / "resume"), capture_output=True, text=True, timeout=1200)
        t_resume = time.monotonic()
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stdout[-3000:] + again.stderr[-3000:]
        assert _left(tmp_path / "resume", roots, 60) == []
        assert_intact(run, workdir)
        if (transport, target, point) in LOST:
            assert rc == 0, (rc, said[-3000:])
            warnings = [line for line in said.splitlines() if line.startswith("warning:")]
            assert len(warnings) == 1 and "partition 1" in warnings[0] and "lost" in warnings[0], said[-3000:]
            assert f"{run} is finished" in again.stdout and "nothing to resume" in again.stdout
            lost = json.loads((run / "summary.json").read_text())["lost"]
            assert lost and {x["id"] for x in lost} == {1}, lost
            outcome, why = "cannot", warnings[0]
        else:
            assert_same_as(run, reference)
            outcome = "finished, bit-identical" if rc == 0 or "nothing to resume" in again.stdout else "resumed, bit-identical"
            why = (_errors(said) or ["(launcher killed: no output)" if rc < 0 else "(finished)"])[0]
        assert (run / "summary.json").is_file() and not list(run.glob(".final*"))
        _report({"transport": transport, "target": target, "point": point, "stopped": reached["what"], "killed": len(pids), "rc": rc,
                 "outcome": outcome, "said": why, "state": state, "to_kill_s": round(t_kill - t0), "teardown_s": round(t_clean - t_kill, 1),
                 "launcher_end_s": round(t_end - t_kill, 1), "resume_s": round(t_resume - t_clean), "total_s": round(t_resume - t0)})
    finally:
        (tag / "release").touch()
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        _cleanup(tag, roots)
        _cleanup(tmp_path / "resume", roots)
