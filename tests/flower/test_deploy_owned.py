"""``fedlora deploy`` owns its federation: whatever ends the launcher ends every process of its deployment.

One slow test, three launches of ``configs/tiny.yaml`` on a tiny random Llama (the claim is about processes, not
the model): a launcher SIGKILLed in the middle of round 1 leaves no process behind; a second launcher on the run is
refused in one line while a first one runs; SIGTERM tears a launch down cleanly and names ``--resume``; the resume
then finishes the run. The deployment's processes are found by the launcher's process tree and by the folders
they run in (the run folder and its workdir), never by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.flower.conftest import FAST, TINY, read_metrics

pytestmark = pytest.mark.slow


def _launch(args: list[str], out: Path) -> subprocess.Popen:
    """``fedlora <args>`` in a session of its own (only it gets the signals the test sends), output in ``out``."""
    with open(out, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "fedlora.cli", *args], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _within(roots: list[Path]) -> list[psutil.Process]:
    """Live processes that run in one of ``roots`` or name one in their command line."""
    found = []
    for p in psutil.process_iter(["cwd", "cmdline", "status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        where, cmd = p.info["cwd"] or "", " ".join(p.info["cmdline"] or [])
        if any(where.startswith(str(r)) or str(r) in cmd for r in roots):
            found.append(p)
    return found


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie
        return "?"


def _until(what: str, check, timeout: float, proc: subprocess.Popen | None = None, out: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc is None or proc.poll() is None, f"the launcher ended before {what}:\n{out.read_text()[-3000:] if out else ''}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _gone(procs: list[psutil.Process], roots: list[Path], timeout: float) -> list[str]:
    """What is still alive of ``procs`` or in ``roots`` after ``timeout`` seconds (nothing, we hope)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if _alive(p)] + _within(roots)
        if not left or time.monotonic() > deadline:
            return sorted({f"{p.pid} {_cmd(p)[:200]}" for p in left})
        time.sleep(0.2)


def test_deploy_owns_its_federation_whatever_ends_the_launcher(tiny_model, tmp_path):
    run, work = tmp_path / "run", tmp_path / ".run.flower"
    roots = [run, work]

    # 1. output.dir is the run folder; SIGKILL in the middle of round 1, ClientApps training: nothing of it stays
    first_out = tmp_path / "first.out"
    first = _launch(["deploy", str(TINY), *FAST, f"model.path={tiny_model}", f"output.dir={run}"], first_out)
    try:
        _until("round-0 checkpoint", lambda: (run / "checkpoints" / "round-0000" / "state.json").is_file(), 600, first, first_out)
        _until("round-1 training", lambda: any("Receiving: train message" in p.read_text() for p in (work / "logs").glob("node-*.log")),
               600, first, first_out)
        time.sleep(3)  # the ClientApps are up
        deployment = _tree(first)
        names = " ".join(_cmd(p) for p in deployment)
        assert all(x in names for x in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr run")), names
        first.send_signal(signal.SIGKILL)
        first.wait()
        t_kill = time.monotonic()
        assert _gone(deployment, roots, 20) == [], "processes of the SIGKILLed deployment are still running"
        print(f"\n{len(deployment)} processes of the deployment, all gone {time.monotonic() - t_kill:.1f} s after SIGKILL")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert [m["round"] for m in read_metrics(run)] == [0]

    # 2. a second launcher on the run is refused in one line while one runs; SIGTERM: a clean teardown naming --resume
    second_out = tmp_path / "second.out"
    second = _launch(["deploy", "--resume", str(run)], second_out)
    try:
        _until("ServerApp of the resumed run", lambda: any("flwr-serverapp" in _cmd(p) for p in _tree(second)), 300, second, second_out)
        before = {name: (run / name).read_bytes() for name in ("config.yaml", "partition.json")}
        third = subprocess.run([sys.executable, "-m", "fedlora.cli", "deploy", "--resume", str(run)], capture_output=True, text=True, timeout=300)
        assert third.returncode == 2, third.stdout + third.stderr
        lines = [line for line in (third.stdout + third.stderr).splitlines() if line.strip()]
        assert lines == [f"error: --resume: {run} is in use by another fedlora launcher (accepted: one launcher per run folder at a time; "
                         "wait for it, or stop it: its whole deployment stops with it)"], lines
        assert {name: (run / name).read_bytes() for name in before} == before
        deployment = _tree(second)
        second.send_signal(signal.SIGTERM)
        assert second.wait(180) == 128 + signal.SIGTERM
        said = second_out.read_text().strip().splitlines()[-1]
        assert said == f"stopped by SIGTERM: every process of this deployment has ended; continue it with: fedlora deploy --resume {run}", said
        assert _gone(deployment, roots, 5) == []
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()

    # 3. the resume finishes the run
    last = subprocess.run([sys.executable, "-m", "fedlora.cli", "deploy", "--resume", str(run)], capture_output=True, text=True, timeout=1200)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert f"run folder {run}: global loss" in last.stdout
    assert [m["round"] for m in read_metrics(run)] == [0, 1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["transport"] == "flower" and (run / "final" / "adapter_model.safetensors").is_file()
    assert _gone([], roots, 5) == [] and not (work / "homes").exists()
