"""Processes the local launcher starts: free ports, waiting for a port, stopping a process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class FlowerRunError(RuntimeError):
    """A Flower run that left no summary.json; the message carries the tail of its logs."""


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exited(proc, 0):
            raise FlowerRunError(f"{proc.args[0]} exited before listening on {port}\n{_tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerRunError(f"{proc.args[0]} not listening on {port} after {timeout:.0f} s\n{_tail(log)}")


def _stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15) -> None:
    """Signal the process group we started (its id is the leader's PID), then reap the leader.

    The leader is reaped last: until then its PID, which is the group id, cannot be reused, so
    the signals reach only the processes this launcher started and their children.
    """
    _signal_group(proc, sig)
    if not _exited(proc, grace):
        _signal_group(proc, signal.SIGKILL)
        _exited(proc, 10)
    _signal_group(proc, signal.SIGKILL)  # members that outlived their leader (a SuperExec, a ClientApp)
    proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the leader to exit without reaping it (``WNOWAIT``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
