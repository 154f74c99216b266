"""Processes the local launcher starts: free ports, waiting for a port, stopping a process group, and the
guard that ends every process of a deployment with its launcher, whatever signal ends the launcher.

Flower's own processes start more processes, some detached in sessions of their own (the SuperLink
starts its SuperExec with ``start_new_session``; the SuperExecs start the ServerApp and every
ClientApp). A process group cannot hold them all, so every process a launch starts carries
``FEDLORA_LAUNCH=<launch id>`` in its environment, which Flower's processes hand down to theirs. A
small watchdog process (``python -m fedlora.flower.processes watch <launch id>``), started before any
of them, waits on a pipe that only the launcher holds open: when the launcher ends — a clean stop,
an exception, SIGTERM or SIGKILL alike — the pipe closes and the watchdog kills every process that
carries the launch's id (read from ``/proc/<pid>/environ``, never matched by name), every descendant
of one, and every member of a session one of them leads (learned while the launch runs: Ray's agents
write their process title over their environment, and are orphans by the time the raylet is gone),
until none is left. The processes the launcher starts itself also get a parent-death signal (Linux
``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LOOK_EVERY = 5.0
"""Seconds between the watchdog's looks at the running launch (it learns the sessions its processes lead)."""

LAUNCH_ENV = "FEDLORA_LAUNCH"
"""Set in the environment of every process a launch starts (and so of every process those start): the launch's id."""


class FlowerRunError(RuntimeError):
    """A Flower run that failed or left no summary.json of its own.

    ``line`` is one line that says what happened and names the log; ``str()`` adds the tails of the logs."""

    def __init__(self, line: str, details: str = "", cause: str | None = None) -> None:
        super().__init__(f"{line}\n{details}" if details else line)
        self.line, self.cause = line, cause  # cause: what died or failed, when known


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


_CAUSE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Failed|Exit))(?::\s*(.*))?$")


def last_error(text: str, limit: int = 300) -> str | None:
    """The last ``SomeError: message`` line of a log (a traceback's last line), shortened to ``limit`` characters."""
    for line in reversed(text.splitlines()):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # colours of a streamed log
        if m := _CAUSE.match(line):
            said = f"{m.group(1)}: {m.group(2)}" if m.group(2) else m.group(1)
            return said if len(said) <= limit else said[: limit - 1] + "…"
    return None


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path, name: str | None = None) -> None:
    name = name or Path(str(proc.args[0])).name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exited(proc, 0):
            raise FlowerRunError(f"{name} exited before listening on port {port} (its log: {log})", _tail(log))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerRunError(f"{name} not listening on port {port} after {timeout:.0f} s (its log: {log})", _tail(log))


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


def how_ended(proc: subprocess.Popen) -> str | None:
    """How ``proc`` ended, without reaping it (``WNOWAIT``): ``killed by SIGKILL``, ``exited with code 1``; None while it runs."""
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already reaped
        if proc.returncode is None:
            return "ended"
        killed, status = proc.returncode < 0, abs(proc.returncode)
    else:
        if info is None:
            return None
        killed, status = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED), info.si_status
    if not killed:
        return f"exited with code {status}"
    try:
        return f"was killed by {signal.Signals(status).name}"
    except ValueError:
        return f"was killed by signal {status}"


# ---- one launcher per run folder --------------------------------------------------------------


def hold(folder: Path) -> int | None:
    """An exclusive ``flock`` on the folder itself (no file is written into it), held until this process ends;
    None when another process holds it. The descriptor is not inherited by the processes this one starts."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def busy(lock_file: Path) -> bool:
    """Whether another process holds ``lock_file`` (``fedlora run``'s and the ServerApp's ``RUN_DIR/.lock``); creates nothing."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ---- the processes of a launch die with it ---------------------------------------------------

_PDEATH = ("import ctypes, os, sys\n"
           "ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG: SIGKILL when the launcher ends\n"
           "if os.getppid() != int(sys.argv[1]):  # the launcher ended before the line above\n"
           "    os._exit(137)\n"
           "os.execvp(sys.argv[2], sys.argv[2:])")


def with_parent_death(cmd: list[str]) -> list[str]:
    """``cmd`` started through a tiny exec wrapper that sets the parent-death signal (Linux) and then becomes ``cmd``
    (the same PID, so the same process group). Done after the fork in a fresh interpreter, not in ``preexec_fn``,
    which is unsafe in a process with threads (pytest with torch)."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-I", "-S", "-c", _PDEATH, str(os.getpid()), *cmd]


def launch_processes(launch: str, exclude: int | None = None, sessions: set[int] | None = None) -> list[int]:
    """PIDs of the live processes of a launch (this user's; never by name): those whose environment carries
    ``FEDLORA_LAUNCH=<launch>``, every descendant of those, and, with ``sessions``, every member of a session one of
    them leads (``sessions`` keeps those session ids from call to call, so members orphaned by an earlier kill are
    still found). The environment alone is not enough: Ray's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``)
    write their process title over it, and /proc then shows only NULs; their parent and their session still say whose
    they are."""
    needle = f"{LAUNCH_ENV}={launch}".encode()
    table: dict[int, tuple[int, int]] = {}  # pid → (parent, session)
    tagged: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in (exclude, os.getpid()):
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            state, parent, _, session = stat[stat.rindex(b")") + 2:].split()[:4]
            if state == b"Z":  # a zombie: dead already
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except (OSError, ValueError):  # gone, or another user's
            continue
        table[pid] = (int(parent), int(session))
        if needle in env.split(b"\0"):
            tagged.add(pid)
    if sessions is not None:
        sessions.update(pid for pid in tagged if table[pid][1] == pid)  # session leaders of the launch (its own setsid)
        # a session id stays taken while any process is in it (Linux frees the number only then): an empty session is
        # forgotten, so a session learned here can never be another process's that reused the number
        sessions.intersection_update({session for _, session in table.values()})
    found = tagged | {pid for pid, (_, session) in table.items() if sessions and session in sessions}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    todo = list(found)
    while todo:  # and every descendant
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def sweep(launch: str, timeout: float = 60, exclude: int | None = None, sessions: set[int] | None = None) -> int:
    """SIGKILL every process of the launch until three looks in a row find none (one being killed may be
    starting another); how many were killed. ``sessions``: the launch's sessions learned while it ran."""
    killed, quiet, deadline = set(), 0, time.monotonic() + timeout
    sessions = set() if sessions is None else sessions
    while quiet < 3 and time.monotonic() < deadline:
        pids = launch_processes(launch, exclude, sessions)
        quiet = 0 if pids else quiet + 1
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.1)
    return len(killed)


class Watchdog:
    """The watchdog of one launch; ``close()`` (or the launcher's end, however it ends) makes it sweep and exit."""

    def __init__(self, launch: str, remove: list[Path], log: Path) -> None:
        read, self._write = os.pipe()  # both ends close-on-exec: only the watchdog gets the read end (as stdin)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "fedlora.flower.processes", "watch", launch, *map(str, remove)],
                                         stdin=read, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        os.close(read)

    def close(self, timeout: float = 90) -> None:
        """Sweep now and wait until the watchdog is done."""
        if self._write is not None:
            os.close(self._write)
            self._write = None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def watch(launch: str, remove: list[str]) -> None:
    """The watchdog: wait for EOF on stdin (the launcher ended or stopped), kill what is left of the launch, remove
    the launch's scratch folders (the first one's parent too, when it is empty). Ctrl-C and a closed terminal do not stop it (it runs in its own session too)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sessions: set[int] = set()  # the sessions the launch's processes lead, learned while it runs (see launch_processes)
    while True:
        try:
            if not select.select([0], [], [], LOOK_EVERY)[0]:
                launch_processes(launch, sessions=sessions)
                continue
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    n = sweep(launch, sessions=sessions)
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)
    if remove:
        try:
            os.rmdir(Path(remove[0]).parent)  # the launch's FLWR_HOMEs come first: their parent (homes/) goes when no other launch's is there
        except OSError:
            pass
    if n:
        print(f"{time.strftime('%H:%M:%S')} watchdog: launch {launch} ended; killed {n} of its processes that were still running", flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "watch":
        watch(sys.argv[2], sys.argv[3:])
