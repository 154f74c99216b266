"""A whole Flower deployment on one machine: a SuperLink, N SuperNodes, ``flwr run``, teardown.

    python -m fedlora.flower.launch --config configs/tiny.yaml --nodes 3 [--tls [--auth]] \
        [--output runs/x] [--node-rank 2=1 …] [key=value …]
    python -m fedlora.flower.launch --simulation [--client-cpus 1] [--client-gpus 0.5] …   # Ray, no SuperNodes

Every process listens on 127.0.0.1 on a free port, runs in its own process group, and is
stopped by that group's id (never by name). The launch owns its federation: every process it
starts, and every process those start (Flower's SuperExecs, the ServerApp, the ClientApps, Ray),
ends with the launcher, however it ends (``fedlora.flower.processes``: a parent-death signal and a
watchdog that kills what carries the launch's id). One launcher per run folder and per workdir
(``flock``, taken before anything starts). Each launch has its own FLWR_HOMEs, the CLI's with
the ``[superlink.fedlora-local]`` entry. Tests use ``LocalFederation`` directly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, NoReturn

from fedlora.flower import APP_DIR
from fedlora.flower.processes import (LAUNCH_ENV, FlowerRunError, Watchdog, _bin, _exited, _stop_group, _tail, _wait_port, busy,
                                      free_port, hold, how_ended, last_error, with_parent_death)
from fedlora.flower.settings import ENV, STATE_ENV, THREADS_ENV

CONNECTION = "fedlora-local"


def summary_mark(path: Path) -> tuple[int, int, str] | None:
    """What tells one summary.json from another: (inode, mtime in ns, SHA-256); None when there is none."""
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass
class RunHandle:
    """A ``flwr run`` in progress."""

    proc: subprocess.Popen
    output_dir: Path
    log: Path
    federation: "LocalFederation"
    stale: frozenset[bytes] = frozenset()  # metrics lines the folder held before the run started (a resumed run's): not news
    summary_before: tuple[int, int, str] | None = None  # the folder's summary.json before the run started (an earlier run's): not this run's
    started: float = 0.0  # time.time() when the run was submitted
    server_log_from: int = 0  # where this launch's part of superlink.log starts

    def running(self) -> bool:
        return not _exited(self.proc, 0)

    def wait(self, timeout: float | None = None, on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Wait for the run; the summary.json its ServerApp wrote, or FlowerRunError (one line naming the logs, then their tails).

        ``flwr run`` exits 0 even when the ServerApp fails (it refused the folder, say), so only a summary.json written
        after the submit, unlike the one the folder held before, is this run's. ``on_round``: each new metrics line."""
        name = next(n for n, p in self.federation.procs.items() if p is self.proc)
        deadline, pos = time.monotonic() + (timeout if timeout is not None else float("inf")), (0, -1)  # a real run may take days
        while not (done := _exited(self.proc, min(2.0, max(0.0, deadline - time.monotonic())))) and time.monotonic() < deadline:
            pos = self._new_rounds(pos, on_round)
        self._new_rounds(pos, on_round)
        _stop_group(self.federation.procs.pop(name))  # reaps it (and anything it left in its group)
        server_log = self.federation.logs / "superlink.log"
        if not done:
            raise FlowerRunError(f"flwr run did not finish within {timeout:.0f} s (logs: {self.log}, {server_log})", _tail(self.log))
        summary = self.output_dir / "summary.json"
        mark = summary_mark(summary)
        if mark is None or mark == self.summary_before or mark[1] < (self.started - 2) * 1e9:
            server = server_log.read_bytes()[self.server_log_from:].decode(errors="replace") if server_log.exists() else ""
            dead = getattr(self.federation, "casualties", lambda: [])()  # the SuperLink or a SuperNode that died: the cause to name
            cause = "; ".join(dead) or last_error(_tail(self.log, 20000)) or last_error(server[-20000:])
            what = "wrote no summary.json" if mark is None else f"left the summary.json of an earlier run in {self.output_dir} as it was"
            raise FlowerRunError(f"flwr run exited {self.proc.returncode} and the ServerApp {what}"
                                 f"{f' ({cause})' if cause else ''}; see {self.log} and {server_log}",
                                 f"--- flwr run ---\n{_tail(self.log)}\n--- superlink ---\n{server[-4000:]}", cause=cause)
        return json.loads(summary.read_text())

    def _new_rounds(self, pos: tuple[int, int], on_round: Callable[[dict[str, Any]], None] | None) -> tuple[int, int]:
        """Pass each complete metrics line of a round after the last one passed to ``on_round``; (bytes read, last round).

        A poll reads only the bytes after the last one, not the whole file (which grows with the rounds); when the
        file was cut back (a resumed ServerApp drops the rounds after its checkpoint), it is read again from the start.
        Lines the file held before the run started are not news; a redone round's line differs from them (its times)."""
        read, last = pos
        metrics = self.output_dir / "metrics.jsonl"
        if not metrics.is_file():
            return pos
        with open(metrics, "rb") as f:
            if read and (f.seek(read - 1) != read - 1 or f.read(1) != b"\n"):  # shorter, or rewritten: from the start
                read = 0
            f.seek(read)
            new = f.read()
        complete = new[: new.rfind(b"\n") + 1]
        for line in complete.splitlines():
            if line in self.stale:
                continue
            entry = json.loads(line)
            if entry["round"] > last:
                last = entry["round"]
                if on_round:
                    on_round(entry)
        return read + len(complete), last


def metrics_lines(run_dir: Path) -> frozenset[bytes]:
    """The lines of a run folder's metrics.jsonl as they are now (none for a new run)."""
    path = Path(run_dir) / "metrics.jsonl"
    return frozenset(path.read_bytes().splitlines()) if path.is_file() else frozenset()


@dataclass(frozen=True)
class Resources:
    """What each virtual node of Flower's simulation runtime may use: Ray runs as many at once as fit.

    ``gpus`` may be a fraction (0.5: two clients share a GPU)."""

    cpus: float = 1.0
    gpus: float = 0.0

    def federation_config(self, nodes: int) -> str:
        return f"num-supernodes={nodes} client-resources-num-cpus={self.cpus:g} client-resources-num-gpus={self.gpus:g}"


@dataclass
class LocalFederation:
    """A SuperLink and ``nodes`` SuperNodes on loopback; ``node_config[i]`` adds to node i's config.

    Every process it starts carries ``FEDLORA_LAUNCH=<launch>`` and ends with this object's ``stop()`` or with the
    process that made it, however that ends (a watchdog sweeps what is left). Its FLWR_HOMEs are its own, under
    ``workdir/homes/<launch>`` (removed at the end), so two launches on one workdir never share a CLI configuration."""

    workdir: Path
    nodes: int
    tls: bool = False
    auth: bool = False  # SuperNode authentication (implies TLS)
    node_config: dict[int, dict[str, Any]] = field(default_factory=dict)
    threads_per_node: int | None = None  # torch threads of each SuperNode's ClientApps (default: cpu_count // nodes)
    server_threads: int | None = None  # torch threads of the ServerApp (default: torch's own choice)
    simulation: "Resources | None" = None  # Flower's simulation runtime (Ray) instead of SuperNodes
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tls = self.tls or self.auth
        if self.simulation and (self.tls or self.node_config):
            raise ValueError("a simulation federation has no SuperNodes: no TLS, authentication or node config")
        self.launch = f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}-{secrets.token_hex(3)}"
        self.homes = self.workdir / "homes" / self.launch
        self.cli_home = self.homes / "flwr-cli"
        self.watchdog: Watchdog | None = None
        self._runs = max((int(p.stem.removeprefix("run-")) for p in self.logs.glob("run-*.log") if p.stem.removeprefix("run-").isdigit()), default=0)
        self._server_log_from = 0

    # ---- processes --------------------------------------------------------------------------

    def _guard(self) -> None:
        """The watchdog, before the first process: it ends them all when this launcher ends, however it ends."""
        if self.watchdog is None:
            scratch = [self.homes] + ([_ray_tmp(self.workdir)] if self.simulation and not _ray_tmp(self.workdir).is_relative_to(self.workdir) else [])
            self.watchdog = Watchdog(self.launch, scratch, self.logs / "watchdog.log")

    def env(self, home: Path, threads: int | None = None) -> dict[str, str]:
        self._guard()
        env = {**os.environ, **ENV, "FLWR_HOME": str(home), LAUNCH_ENV: self.launch,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        if threads:
            env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        if self.simulation:  # the virtual nodes' bases (STATE_ENV) and Ray's session files; each client's torch threads
            env.update({STATE_ENV: str(self.workdir / "nodes"), "RAY_TMPDIR": str(_ray_tmp(self.workdir)),
                        THREADS_ENV: str(max(1, int(self.simulation.cpus)))})
        return env

    def _spawn(self, name: str, cmd: list[str], home: Path, threads: int | None = None) -> subprocess.Popen:
        cwd = self.workdir / name
        cwd.mkdir(parents=True, exist_ok=True)
        env = self.env(home, threads)
        log = self.logs / f"{name}.log"
        if name == "superlink":
            self._server_log_from = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            out.write(f"--- {datetime.now():%Y-%m-%d %H:%M:%S} launch {self.launch}: {Path(cmd[0]).name} ---\n".encode())
            out.flush()
            proc = subprocess.Popen(with_parent_death(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self, timeout: float = 180) -> "LocalFederation":
        from fedlora.flower.certs import make_node_key, make_tls

        security = ["--insecure"]
        if self.tls:
            self.certs = make_tls(self.workdir / "certs")
            security = ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.cert), "--ssl-keyfile", str(self.certs.key)]
        self._write_cli_config()
        link = self._spawn("superlink", [_bin("flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(self.port),
                                         "--disable-runtime-dependency-installation", *(["--enable-supernode-auth"] if self.auth else []),
                                         *(["--simulation"] if self.simulation else [])],
                           self.homes / "superlink", self.server_threads)
        _wait_port(self.port, link, timeout, self.logs / "superlink.log", "flower-superlink")
        if self.simulation:  # the SuperLink runs the virtual nodes itself, on Ray
            return self
        threads = self.threads_per_node or max(1, (os.cpu_count() or 1) // self.nodes)
        for i in range(self.nodes):
            extra = []
            if self.auth:
                private, public = make_node_key(self.workdir / "keys", f"node-{i}")
                self.flwr("supernode", "register", str(public), CONNECTION)
                extra = ["--auth-supernode-private-key", str(private)]
            self.start_node(i, extra, threads, timeout)
        return self

    def start_node(self, i: int, extra: list[str] | None = None, threads: int | None = None, timeout: float = 180,
                   name: str | None = None, wait: bool = True) -> subprocess.Popen:
        """A SuperNode for partition i (``extra``: more flower-supernode flags); waits until it listens."""
        name = name or f"node-{i}"
        cfg = {"partition-id": i, "num-partitions": self.nodes, "state-dir": str(self.workdir / name / "state"), **self.node_config.get(i, {})}
        node_config = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in cfg.items())
        security = ["--root-certificates", str(self.certs.ca)] if self.tls else ["--insecure"]
        port = free_port()
        proc = self._spawn(name, [_bin("flower-supernode"), *security, "--superlink", self.address, "--port", str(port),
                                  "--node-config", node_config, *(extra or [])], self.homes / name, threads)
        if wait:
            _wait_port(port, proc, timeout, self.logs / f"{name}.log", f"flower-supernode {name}")
        return proc

    def casualties(self) -> list[str]:
        """The SuperLink and SuperNodes of this federation that ended on their own, or were killed by someone else
        (``kill_node`` and ``stop`` take theirs out of ``procs`` first): ``the SuperLink was killed by SIGKILL``."""
        out = []
        for name, proc in self.procs.items():
            if not name.startswith("run-") and (how := how_ended(proc)) is not None:
                who = "the SuperLink" if name == "superlink" else f"SuperNode {name.removeprefix('node-')}" if name.startswith("node-") else name
                out.append(f"{who} {how} (its log: {self.logs / f'{name}.log'})")
        return out

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Stop SuperNode i and every process it started (its ClientApp included), like a crash."""
        _stop_group(self.procs.pop(f"node-{i}"), sig)

    def stop(self) -> None:
        """Stop every process this federation started: runs, then SuperNodes, then the SuperLink; then the watchdog
        kills whatever of the launch is left (a SuperExec in a session of its own, a ServerApp, a ClientApp, Ray).
        SIGTERM, SIGINT and SIGHUP wait until it is done (a second Ctrl-C does not cut the teardown short)."""
        main = threading.current_thread() is threading.main_thread()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}) if main else None
        try:
            self._stop()
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: (n == "superlink", not n.startswith("run-"))):
            _stop_group(self.procs.pop(name))
        if self.watchdog is not None:
            self.watchdog.close()  # sweeps, removes this launch's FLWR_HOMEs and Ray's short folder
            self.watchdog = None
        shutil.rmtree(self.homes, ignore_errors=True)
        if self.simulation and not (ray := _ray_tmp(self.workdir)).is_relative_to(self.workdir):  # Ray's short folder: gone with its processes
            shutil.rmtree(ray, ignore_errors=True)
        try:
            self.homes.parent.rmdir()  # homes/, when no other launch's is there
        except OSError:
            pass

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- runs -------------------------------------------------------------------------------

    def _write_cli_config(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{self.certs.ca}"' if self.tls else "insecure = true"
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n{security}\n'
        )

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The ``flwr`` CLI against this federation."""
        proc = subprocess.run(with_parent_death([_bin("flwr"), *args]), cwd=self.workdir, env=self.env(self.cli_home),
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise FlowerRunError(f"flwr {' '.join(args)} exited {proc.returncode}: {last_error(proc.stdout + proc.stderr) or 'see below'}",
                                 f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc

    def submit(self, config: str | Path, output_dir: Path, overrides: list[str] | None = None, **run_config: Any) -> RunHandle:
        """Start ``flwr run <app> fedlora-local --stream`` with a run-config TOML file; returns at once."""
        import shlex

        import tomli_w

        self._runs += 1
        output_dir = Path(output_dir).resolve()
        values = {"config-path": str(Path(config).resolve()) if Path(config).exists() else str(config),
                  "overrides": shlex.join(overrides or []), "output-dir": str(output_dir)}
        values.update({k.replace("_", "-"): v for k, v in run_config.items()})
        stale = metrics_lines(output_dir)  # before the ServerApp can write anything
        before, started = summary_mark(output_dir / "summary.json"), time.time()
        toml = self.workdir / f"run-{self._runs}.toml"
        toml.write_text(tomli_w.dumps(values))
        log = self.logs / f"run-{self._runs}.log"
        env = self.env(self.cli_home)
        with open(log, "wb") as out:
            sim = ["--federation-config", self.simulation.federation_config(self.nodes)] if self.simulation else []
            proc = subprocess.Popen(with_parent_death([_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(toml), *sim]),
                                    cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[f"run-{self._runs}"] = proc
        return RunHandle(proc, output_dir, log, self, stale, before, started, self._server_log_from)

    def run(self, config: str | Path, output_dir: Path, overrides: list[str] | None = None, timeout: float | None = None,
            on_round: Callable[[dict[str, Any]], None] | None = None, **run_config: Any) -> dict[str, Any]:
        return self.submit(config, output_dir, overrides, **run_config).wait(timeout, on_round)


MIN_GPU_SHARE = 0.001
"""The smallest GPU share accepted. Ray counts resources in steps of 0.0001, and Flower sends the share as a float32,
so 0.0001 itself arrives as 0.0000999… and is refused; nobody needs a thousandth of a GPU finer."""


def simulation_resources(cpus: float, gpus: float | None) -> Resources:
    """Each client's share for Ray, checked against what this machine has (Ray would wait forever for the missing)
    and against what Flower and Ray can carry: Flower passes the CPU share as an integer (its ``SimulationConfig`` field
    is a uint32, in 1.41 and 1.42), and Ray takes a GPU fraction only up to 1 (above it, a whole number)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ValueError("Flower's simulation runtime needs Ray (accepted: pip install -e \".[simulation]\" in the fedlora checkout)")
    import torch

    try:  # what Ray will see: a container's CPU quota, not the host's cores
        from ray._private.utils import get_num_cpus

        have_cpus = int(get_num_cpus())
    except (ImportError, AttributeError):
        have_cpus = os.cpu_count() or 1
    have_gpus = torch.cuda.device_count()
    gpus = (1.0 if have_gpus else 0.0) if gpus is None else gpus
    if not (math.isfinite(cpus) and cpus == int(cpus) and 1 <= cpus <= have_cpus):
        raise ValueError(f"--client-cpus: {cpus:g} (accepted: a whole number of CPUs, at least 1 and at most the {have_cpus} CPUs here; "
                         "Flower passes the share to Ray as an integer)")
    whole_or_fraction = gpus == int(gpus) if math.isfinite(gpus) else False
    if not (math.isfinite(gpus) and (gpus == 0 or MIN_GPU_SHARE <= gpus <= min(1, have_gpus) or (whole_or_fraction and 1 <= gpus <= have_gpus))):
        raise ValueError(f"--client-gpus: {gpus:g} (accepted: 0 to the {have_gpus} GPUs here; a fraction from {MIN_GPU_SHARE:g} to 1 shares one, "
                         "above 1 a whole number)")
    return Resources(float(cpus), float(gpus))


def node_ranks(values: list[str], nodes: int) -> dict[int, dict[str, int]]:
    """``--node-rank K=R …`` as node configs {K: {"rank": R}}; ValueError (one line) for anything else."""
    out: dict[int, dict[str, int]] = {}
    for value in values:
        node, sep, rank = value.partition("=")
        try:
            if not sep:
                raise ValueError
            k, r = int(node), int(rank)
        except ValueError:
            raise ValueError(f"--node-rank {value}: not K=R (accepted: whole numbers, SuperNode K declares LoRA rank R, e.g. --node-rank 2=1)") from None
        if not 0 <= k < nodes:
            raise ValueError(f"--node-rank {value}: there is no SuperNode {k} (accepted: K from 0 to {nodes - 1}, one SuperNode per client)")
        if r < 1:
            raise ValueError(f"--node-rank {value}: rank {r} (accepted: a positive whole number)")
        if k in out:
            raise ValueError(f"--node-rank {value}: SuperNode {k} already has rank {out[k]['rank']} (accepted: one K=R per SuperNode)")
        out[k] = {"rank": r}
    return out


class Stopped(BaseException):
    """SIGTERM, SIGINT or SIGHUP reached the launcher: tear the deployment down and say how to go on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> Callable[[], None]:
    """The first SIGTERM, SIGINT or SIGHUP raises Stopped; later ones are ignored, so the teardown runs to its end.
    Returns what puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Stopped(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def restore() -> None:
        for sig, previous in old.items():
            signal.signal(sig, previous)

    return restore


def _user_path(value: str | Path) -> Path | None:
    """``~``, ``~user`` expanded, made absolute; None for ``~name`` of no user here."""
    try:
        return Path(value).expanduser().resolve()
    except RuntimeError:  # "Could not determine home directory"
        return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long: no such file either
        return False


def _new_folders(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, deepest first."""
    out = []
    while path != path.parent:
        try:
            if path.exists():
                break
        except OSError:  # a name too long: mkdir says why in a moment
            pass
        out.append(path)
        path = path.parent
    return out


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _tidy(output: Path, created: list[Path]) -> None:
    """A new run that recorded nothing leaves nothing behind: the ServerApp's ``.lock`` goes (it would make the folder
    look used), and the folders this launch created (the run folder and the parents ``--output`` needed). Never
    touches a folder with anything else in it."""
    try:
        if {p.name for p in output.iterdir()} <= {".lock"} and not busy(output / ".lock"):
            (output / ".lock").unlink(missing_ok=True)
            _remove_empty(created)
    except OSError:
        pass


class _Parser(argparse.ArgumentParser):
    """A bad flag or value is one line, as every other refusal of the launcher (not argparse's usage block)."""

    def error(self, message: str) -> NoReturn:
        _error(f"{message} (accepted: {self.prog} --help lists the flags)")
        raise SystemExit(2)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    from fedlora.app.preflight import preflight
    from fedlora.app.run_dir import holds_run, resume_config
    from fedlora.config import ConfigError, build_config, load_config, packaged_config
    from fedlora.methods import MethodError

    p = _Parser(prog="python -m fedlora.flower.launch", description="Run a fedlora config on a local Flower deployment (SuperLink + N SuperNodes on 127.0.0.1).")
    p.add_argument("--config", default=None, help="YAML config (default: the packaged default.yaml)")
    p.add_argument("--nodes", type=int, default=None, help="SuperNodes, one per partition (default: federation.num_clients)")
    p.add_argument("--tls", action="store_true", help="TLS with a generated CA and server certificate")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication with generated keys (implies --tls)")
    p.add_argument("--output", default=None, help="run folder (default: output.dir, else runs/<time>-<method>-flower)")
    p.add_argument("--workdir", default=None, help="logs, certificates, node state (default: .<run folder>.flower beside the run folder, kept for --resume)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run from its newest complete checkpoint (its own config; the same --workdir)")
    p.add_argument("--node-rank", action="append", default=[], metavar="K=R", help="SuperNode K declares rank R (node config `rank`)")
    p.add_argument("--threads-per-node", type=int, default=None, help="torch threads per SuperNode (default: cpu_count // nodes)")
    p.add_argument("--server-threads", type=int, default=None, help="torch threads of the ServerApp's evaluation (default: torch's choice)")
    p.add_argument("--simulation", action="store_true", help="Flower's simulation runtime: the clients as virtual nodes in Ray actors, no SuperNodes")
    p.add_argument("--client-cpus", type=float, default=None, help="--simulation: CPUs (and torch threads) per client, a whole number; Ray runs as many at once as fit (default 1)")
    p.add_argument("--client-gpus", type=float, default=None, help="--simulation: GPUs per client, 0.5 = two share one (default: 1 with CUDA, else 0)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. federation.rounds=5")
    args = p.parse_args(argv)
    if args.resume is not None:  # --resume "" is the current folder, not "no resume": never a new run by mistake
        if (resumed := _user_path(args.resume)) is None:
            return _error(f"--resume: {args.resume}: no such user's home folder (accepted: the folder of an earlier fedlora run)")
        if not _is_file(resumed / "config.yaml"):
            return _error(f"--resume: {resumed} holds no config.yaml (accepted: the folder of an earlier fedlora run)")
        args.config, args.output, args.resume = str(resumed / "config.yaml"), str(resumed), str(resumed)
    config = Path(args.config).resolve() if args.config else packaged_config("default")
    try:
        cfg = resume_config(Path(args.output), None, args.overrides) if args.resume else load_config(config, args.overrides)  # resume: output.* only
        preflight(cfg)
    except (ConfigError, MethodError) as e:
        return _error(str(e))
    except OSError as e:  # a config path the system refuses to look at (a name too long)
        return _error(f"config: cannot read {config} ({e.strerror or type(e).__name__}) (accepted: a YAML file, or no --config for the default)")
    if args.resume:
        from fedlora.app.run_dir import finished

        if finished(Path(args.output), cfg.federation.rounds):
            print(f"{args.output} is finished (round {cfg.federation.rounds} of {cfg.federation.rounds}): nothing to resume, nothing changed", flush=True)
            return 0
    nodes = cfg.federation.num_clients if args.nodes is None else args.nodes  # --nodes 0 is a value, not the default
    if nodes != cfg.federation.num_clients:
        return _error(f"--nodes {nodes}: the config has federation.num_clients={cfg.federation.num_clients} (accepted: one SuperNode per partition)")
    for flag in ("threads_per_node", "server_threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            return _error(f"--{flag.replace('_', '-')}: {getattr(args, flag)} (accepted: a positive whole number of torch threads)")
    simulation = None
    if not args.simulation and (args.client_cpus is not None or args.client_gpus is not None):
        flags = " and ".join(f for f, v in (("--client-cpus", args.client_cpus), ("--client-gpus", args.client_gpus)) if v is not None)
        return _error(f"{flags}: Ray's share per client, only with --simulation (accepted: --simulation, or --threads-per-node for SuperNodes)")
    if args.simulation:
        if args.tls or args.auth or args.node_rank:
            return _error("--simulation has no SuperNodes: --tls, --auth and --node-rank do not apply (accepted: fedlora deploy for them)")
        try:
            simulation = simulation_resources(1.0 if args.client_cpus is None else args.client_cpus, args.client_gpus)
        except ValueError as e:
            return _error(str(e))
    try:
        ranks = node_ranks(args.node_rank, nodes)
        if ranks:  # the ranks the nodes will declare must suit the method, as the config's own do (the ServerApp applies them)
            declared = [ranks.get(k, {}).get("rank", r) for k, r in enumerate(cfg.client_ranks())]
            preflight(build_config(cfg.model_dump(mode="json"), [f"lora.ranks={declared}"]))
    except (ConfigError, MethodError) as e:  # before ValueError, which ConfigError is
        return _error(f"--node-rank: {e}")
    except ValueError as e:
        return _error(str(e))
    default = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.federation.method}-{'ray' if simulation else 'flower'}"
    if (output := _user_path(args.output or cfg.output.dir or default)) is None:
        return _error(f"output.dir: {args.output or cfg.output.dir}: no such user's home folder (accepted: a folder path you can write to)")
    workdir = _user_path(args.workdir) if args.workdir else output.parent / f".{output.name}.flower"  # node state outlives the launcher
    if workdir is None:
        return _error(f"--workdir: {args.workdir}: no such user's home folder (accepted: a folder path you can write to)")
    command = f"fedlora {'simulate' if simulation else 'deploy'}"

    # one launcher per run folder and per workdir: the locks come first, before anything is written or started
    created = _new_folders(output)  # what mkdir makes here, and a refusal or an empty run takes away again
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # under a file, an existing file, a read-only or virtual file system
        _remove_empty(created)  # parents made before the leaf failed
        return _error(f"output.dir: cannot create {output} ({e.strerror or type(e).__name__}) (accepted: a folder path you can write to)")
    held = [hold(output)]
    if held[0] is None:
        return _error(f"{'--resume' if args.resume else 'output.dir'}: {output} is in use by another fedlora launcher "
                      "(accepted: one launcher per run folder at a time; wait for it, or stop it: its whole deployment stops with it)")
    restore, owned = _stop_on_signals(), False
    try:
        if busy(output / ".lock"):
            return _error(f"output.dir: {output} is in use by another fedlora process (accepted: one process per run folder at a time)")
        if not args.resume:
            if holds_run(output):
                return _error(f"output.dir: {output} holds a run (accepted: a new or empty folder, or --resume {output} to continue it)")
            if entries := sorted(x.name for x in output.iterdir() if x.name != ".lock"):
                return _error(f"output.dir: {output} already holds files, e.g. {entries[0]} (accepted: a new or empty folder)")
        made = _new_folders(workdir)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _remove_empty(made)
            return _error(f"--workdir: cannot create {workdir} ({e.strerror or type(e).__name__}) (accepted: a folder path you can write to)")
        held.append(hold(workdir))
        if held[1] is None:
            return _error(f"--workdir: {workdir} is in use by another fedlora launcher (accepted: one launcher per workdir at a time)")
        if not args.resume:
            (output / ".lock").unlink(missing_ok=True)  # a lock nobody holds (checked above): the ServerApp would take it for a file
        owned = True
        return _launch(args, cfg, config, nodes, ranks, simulation, output, workdir, command)
    except Stopped as s:  # before the federation started: nothing to tear down
        print(f"stopped by {signal.Signals(s.signum).name} before anything started", file=sys.stderr, flush=True)
        return 128 + s.signum
    finally:
        if owned and not args.resume:
            _tidy(output, created)
        elif not owned:  # refused: the folders made for it go again, and nothing else was touched
            _remove_empty(created)
        restore()
        for fd in held:
            if fd is not None:
                os.close(fd)


def _launch(args: argparse.Namespace, cfg: Any, config: Path, nodes: int, ranks: dict[int, dict[str, int]], simulation: Resources | None,
            output: Path, workdir: Path, command: str) -> int:
    t0 = time.perf_counter()
    before, started = summary_mark(output / "summary.json"), time.time()
    try:
        with LocalFederation(workdir, nodes, tls=args.tls, auth=args.auth, node_config=ranks, simulation=simulation,
                             threads_per_node=args.threads_per_node, server_threads=args.server_threads) as fed:
            where = (f"{nodes} virtual nodes on Ray, each {simulation.cpus:g} CPU, {simulation.gpus:g} GPU" if simulation
                     else f"{nodes} SuperNodes")
            print(f"SuperLink {fed.address}{' (TLS)' if fed.tls else ''}, {where}; logs and node state in {workdir}", flush=True)
            print(f"run folder {output}: {cfg.federation.rounds} rounds of {cfg.federation.method}, one line per round", flush=True)
            summary = fed.run(config, output, args.overrides, on_round=lambda e: _print_round(e, t0, cfg.federation.rounds),
                              **({"resume": True} if args.resume else {}))
    except FlowerRunError as e:
        if (done := _summary_since(output, before, started)) is None:
            again = f"{command} --resume {output}" + (f" --workdir {workdir}" if args.workdir else "")
            went_on = f"; every process of this deployment has ended; continue it with: {again}" if (output / "config.yaml").is_file() else ""
            print(f"error: {e.line}{went_on}", file=sys.stderr, flush=True)
            return 1
        # the ServerApp wrote the run's summary.json (its last file, after final/) before the teardown ended it: done
        summary = done
        print(f"warning: flwr run exited {e.cause and f'({e.cause}) ' or ''}as the ServerApp finished the run; the run folder is "
              "complete (nothing to resume)", file=sys.stderr, flush=True)
    except Stopped as s:
        again = f"{command} --resume {output}" + (f" --workdir {workdir}" if args.workdir else "")
        went_on = (f"continue it with: {again}" if (output / "config.yaml").is_file()
                   else "it had recorded nothing yet: run the same command again")
        print(f"stopped by {signal.Signals(s.signum).name}: every process of this deployment has ended; {went_on}", file=sys.stderr, flush=True)
        return 128 + s.signum
    print(f"run folder {output}: global loss {summary['global_loss']['before']:.4f} → {summary['global_loss']['after']:.4f}, "
          f"wire bytes up {summary['wire_bytes_up']:,} down {summary['wire_bytes_down']:,}, {time.perf_counter() - t0:.0f} s", flush=True)
    if line := lost_line(summary.get("lost") or []):
        print(line, file=sys.stderr, flush=True)
    return 0


def _summary_since(output: Path, before: tuple[int, int, str] | None, started: float) -> dict[str, Any] | None:
    """The run's summary.json when this launch's ServerApp wrote it (not the one the folder held before), else None."""
    mark = summary_mark(output / "summary.json")
    if mark is None or mark == before or mark[1] < (started - 2) * 1e9:
        return None
    try:
        return json.loads((output / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def lost_line(lost: list[dict[str, Any]]) -> str | None:
    """One line for a run that went on without some clients (a SuperNode killed, a node that timed out): which
    partitions in which rounds, and why the run is not the one an uninterrupted deployment gives. None if none was lost."""
    if not lost:
        return None
    rounds: dict[int, list[int]] = {}
    for x in lost:
        rounds.setdefault(int(x["id"]), []).append(int(x["round"]))
    where = "; ".join(f"partition {k} in round{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}" for k, r in sorted(rounds.items()))
    first = str(lost[0].get("error") or "").splitlines()[0][:160] if lost[0].get("error") else "no reply"
    return (f"warning: {len(lost)} client update{'s' if len(lost) > 1 else ''} lost ({where}; {first}): the run went on without "
            f"{'them' if len(lost) > 1 else 'it'}, so it is not the run an uninterrupted deployment gives and --resume cannot make it one "
            "(summary.json \"lost\")")


def _print_round(entry: dict[str, Any], t0: float, rounds: int) -> None:
    from fedlora.report.table import round_line

    took = f", {len(entry['clients'])} clients" if entry.get("clients") else ""
    lost = f", partition{'s' if len(entry['lost']) > 1 else ''} {', '.join(str(x['id']) for x in entry['lost'])} lost" if entry.get("lost") else ""
    print(f"{round_line(entry)} (of {rounds}{took}{lost}, {time.perf_counter() - t0:.0f} s)", flush=True)


RAY_SOCKET_SUFFIX = len("/ray/session_2026-12-02_19-49-33_203177_4194304/sockets/plasma_store")
"""What Ray appends to RAY_TMPDIR for its longest socket path (its own ray/, a session named by time and a 7-digit pid)."""


def _ray_tmp(workdir: Path) -> Path:
    """Ray's session folder: its socket paths must stay under 108 bytes (AF_UNIX), so a short one when the workdir is deep."""
    inside = workdir / "ray"
    if len(str(inside)) + RAY_SOCKET_SUFFIX < 108:
        return inside
    import tempfile

    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    return base / f"fedlora-ray-{hashlib.sha256(str(workdir).encode()).hexdigest()[:10]}"


if __name__ == "__main__":
    sys.exit(main())
