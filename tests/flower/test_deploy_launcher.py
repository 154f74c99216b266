"""The launcher's process handling and argument checks, without Flower processes (fast)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.flower.launch import _exited, _stop_group, free_port, main
from tests.flower.conftest import TINY


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is gone
    except FileNotFoundError:
        return False


def test_deploy_stop_group_ends_the_leader_and_what_it_started(tmp_path):
    pidfile = tmp_path / "child"
    code = f"import subprocess, time; p = subprocess.Popen(['sleep', '300']); open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(300)"
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert _alive(child) and not _exited(leader, 0)
    finally:
        _stop_group(leader)
    assert leader.returncode is not None
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:  # reparented to init: reaped when init gets to it
        time.sleep(0.05)
    assert not _alive(child)


def test_deploy_free_ports_are_distinct_loopback_ports():
    ports = {free_port() for _ in range(5)}
    assert len(ports) == 5 and all(1024 < p < 65536 for p in ports)


def test_deploy_launcher_refuses_a_node_count_other_than_the_clients(capsys):
    assert main(["--config", str(TINY), "--nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --nodes 2:") and "federation.num_clients=3" in err
    assert main(["--config", str(TINY), "lora.ranks=[4,2]"]) == 2
    assert "lora.ranks" in capsys.readouterr().err
    assert os.environ.get("FLWR_TELEMETRY_ENABLED") == "0"  # tests/flower/conftest.py sets the Flower environment


def test_deploy_resume_needs_a_run_folder(tmp_path, capsys):
    assert main(["--resume", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and "holds no config.yaml" in err


def test_deploy_reports_each_round_as_its_metrics_line_lands(tmp_path):
    """``wait`` passes every new complete metrics line on while the run goes, not only at its end."""
    import json
    from types import SimpleNamespace

    from fedlora.flower.launch import RunHandle, metrics_lines

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n")  # a resumed run's earlier round: not news
    writer = (
        "import json, time, pathlib; d = pathlib.Path(%r)\n"
        "for r in (1, 2, 3):\n"
        "    time.sleep(0.3)\n"
        "    with open(d / 'metrics.jsonl', 'a') as f: f.write(json.dumps({'round': r, 'eval': {'global': {'loss': 1.0 / r}}}) + '\\n')\n"
        "(d / 'summary.json').write_text(json.dumps({'rounds': 3}))\n" % str(out)
    )
    stale = metrics_lines(out)  # as LocalFederation.submit takes them, before the run starts
    proc = subprocess.Popen([sys.executable, "-c", writer], start_new_session=True)
    seen = []
    handle = RunHandle(proc, out, tmp_path / "run.log", SimpleNamespace(procs={"run-1": proc}, logs=tmp_path), stale)
    assert handle.wait(timeout=60, on_round=seen.append) == {"rounds": 3}
    assert [e["round"] for e in seen] == [1, 2, 3]


def test_simulate_refuses_resources_this_machine_lacks_in_one_line(capsys):
    """Ray would wait forever for a GPU or CPUs that are not there: each is one line before anything starts."""
    pytest.importorskip("ray")
    from fedlora.cli import main as cli

    from ray._private.utils import get_num_cpus

    cpus = int(get_num_cpus())  # what Ray counts: a container's quota
    for share in ("0", "0.0001", "0.5", "nan", str(cpus + 1)):  # Flower carries the CPU share as an integer (a uint32)
        assert cli(["simulate", str(TINY), "--client-cpus", share]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --client-cpus: {float(share):g} (accepted: a whole number of CPUs, at least 1 "
                                                        f"and at most the {cpus} CPUs here"), err
    import torch

    gpus = torch.cuda.device_count()
    for share in (str(gpus + 1), "0.0001", "-1", "inf", *(["1.5"] if gpus >= 2 else [])):  # Ray: steps of 0.0001 (float32 on Flower's wire), whole above 1
        assert cli(["simulate", str(TINY), "--client-gpus", share]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--client-gpus: {float(share):g} (accepted: 0 to the {gpus} GPUs here" in err, err
    assert cli(["simulate", str(TINY), "lora.ranks=[4,2]"]) == 2  # the config is checked as for fedlora run
    assert "lora.ranks" in capsys.readouterr().err


def test_deploy_resume_of_a_finished_run_starts_nothing_and_changes_nothing(tmp_path, capsys):
    import hashlib
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TINY.read_text())
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in (0, 1, 2)))  # tiny.yaml: 2 rounds
    (run / "summary.json").write_text("{}")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()}
    assert main(["--resume", str(run), "federation.rounds=5"]) == 2  # a resume keeps the run's own settings
    assert "--resume: federation.rounds=5 differs from 2" in capsys.readouterr().err
    assert main(["--resume", str(run), "output.trackers=[tensorboard]"]) == 0  # output.* may change
    assert "is finished (round 2 of 2): nothing to resume" in capsys.readouterr().out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()} == before
    assert not (tmp_path / ".run.flower").exists()  # no federation was started


def test_deploy_resume_reports_the_redone_round(tmp_path):
    """A resumed ServerApp cuts metrics.jsonl back to its checkpoint and redoes the rounds after it: each is news,
    the lines the file held before are not (round 2 was written, but its checkpoint was not complete)."""
    import json
    from types import SimpleNamespace

    from fedlora.flower.launch import RunHandle, metrics_lines

    out = tmp_path / "run"
    out.mkdir()
    old = [json.dumps({"round": r, "wall_s": 1.0}) + "\n" for r in (0, 1, 2)]
    (out / "metrics.jsonl").write_text("".join(old))
    writer = (
        "import json, os, time, pathlib; d = pathlib.Path(%r); old = %r\n"
        "time.sleep(0.3); (d / 'm.tmp').write_text(''.join(old[:2])); os.replace(d / 'm.tmp', d / 'metrics.jsonl')\n"
        "for r in (2, 3):\n"
        "    time.sleep(0.3)\n"
        "    with open(d / 'metrics.jsonl', 'a') as f: f.write(json.dumps({'round': r, 'wall_s': 2.0}) + '\\n')\n"
        "(d / 'summary.json').write_text(json.dumps({'rounds': 3}))\n" % (str(out), old)
    )
    stale = metrics_lines(out)  # as LocalFederation.submit takes them, before the run starts
    proc = subprocess.Popen([sys.executable, "-c", writer], start_new_session=True)
    seen = []
    handle = RunHandle(proc, out, tmp_path / "run.log", SimpleNamespace(procs={"run-1": proc}, logs=tmp_path), stale)
    assert handle.wait(timeout=60, on_round=seen.append) == {"rounds": 3}
    assert [(e["round"], e["wall_s"]) for e in seen] == [(2, 2.0), (3, 2.0)]


def test_rays_socket_paths_fit_whatever_the_workdir(tmp_path):
    """Ray puts AF_UNIX sockets (at most 107 bytes) under its temp folder: a deep workdir, as under a checkout's runs/, gets a short one."""
    from fedlora.flower.launch import RAY_SOCKET_SUFFIX, _ray_tmp

    for workdir in (Path("/w"), Path("/work/cirun/main/runs/.20261202-194927-flora-ray.flower"), tmp_path / ("x" * 120)):
        assert len(str(_ray_tmp(workdir))) + RAY_SOCKET_SUFFIX < 108, workdir
    assert _ray_tmp(Path("/w")) == Path("/w/ray")  # beside the logs when it fits
    assert _ray_tmp(tmp_path / "a") != _ray_tmp(tmp_path / "b")  # one per workdir


DEPLOY_ERRORS = [
    # (fedlora deploy arguments after the config, what the one line must say); each before any process or file
    (["--node-rank", "0=abc"], ["--node-rank 0=abc", "not K=R", "accepted: whole numbers"]),
    (["--node-rank", "5"], ["--node-rank 5", "not K=R", "e.g. --node-rank 2=1"]),
    (["--node-rank", "7=2"], ["--node-rank 7=2", "no SuperNode 7", "accepted: K from 0 to 2"]),
    (["--node-rank", "1=0"], ["--node-rank 1=0", "rank 0", "accepted: a positive whole number"]),
    (["--node-rank", "1=2", "--node-rank", "1=3"], ["--node-rank 1=3", "SuperNode 1 already has rank 2", "one K=R per SuperNode"]),
    (["--node-rank", "1=3", "federation.method=fedit", "lora.ranks=null", "lora.rank=2"],  # the ranks the nodes declare must suit the method
     ["error: --node-rank: federation.method: 'fedit' needs one rank for every client", "[2, 3, 2]"]),
    (["lora.ranks=[4,2]"], ["lora.ranks", "exactly 3 ranks"]),
]


@pytest.mark.parametrize(("extra", "says"), DEPLOY_ERRORS, ids=[" ".join(c[0])[:40] for c in DEPLOY_ERRORS])
def test_deploy_bad_arguments_are_one_line_before_anything_starts(tmp_path, capfd, extra, says):
    from fedlora.cli import main as cli

    assert cli(["deploy", str(TINY), "--output", str(tmp_path / "run"), *extra]) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert all(part in lines[0] for part in says), lines[0]
    assert list(tmp_path.iterdir()) == []  # no run folder, no workdir


def test_deploy_honours_output_dir_and_refuses_a_used_folder_in_one_line(tmp_path, capfd):
    """``output.dir=X`` is the run folder, as for ``fedlora run``; a folder with files, or a run's folder, is refused
    before anything starts, and nothing in it changes."""
    from fedlora.cli import main as cli

    used = tmp_path / "notes"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert cli(["deploy", str(TINY), f"output.dir={used}"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"error: output.dir: {used} already holds files, e.g. notes.txt (accepted: a new or empty folder)" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TINY.read_text())
    (run / "summary.json").write_text('{"global_loss": {"before": 9, "after": 9}}')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert cli(["deploy", str(TINY), "lora.scale=3.0", "--output", str(run)]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"output.dir: {run} holds a run (accepted: a new or empty folder, or --resume {run}" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before and {p.name for p in tmp_path.iterdir()} == {"notes", "run"}


def _holder(code: str) -> subprocess.Popen:
    """Another process holding a lock, as a second launcher (or ``fedlora run``) would; it says ``held`` once it does."""
    proc = subprocess.Popen([sys.executable, "-c", code + "\nprint('held', flush=True)\nimport time; time.sleep(300)"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_deploy_a_second_launcher_on_a_run_is_refused_in_one_line_and_changes_nothing(tmp_path, capfd):
    """One launcher per run folder (a flock on the folder, taken before anything starts), and none while another
    fedlora process (``fedlora run --resume``, a ServerApp) holds the run's own ``.lock``."""
    from fedlora.cli import main as cli

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TINY.read_text())
    (run / "metrics.jsonl").write_text('{"round": 0}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    launcher = _holder(f"from fedlora.flower.processes import hold; fd = hold(__import__('pathlib').Path({str(run)!r})); assert fd is not None")
    try:
        assert cli(["deploy", "--resume", str(run)]) == 2
    finally:
        _stop_group(launcher)
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"error: --resume: {run} is in use by another fedlora launcher (accepted: one launcher per run folder" in err, err
    (run / ".lock").touch()
    before[".lock"] = b""
    other = _holder(f"from fedlora.app.run_dir import lock; h = lock(__import__('pathlib').Path({str(run)!r}))")
    try:
        assert cli(["deploy", "--resume", str(run)]) == 2
    finally:
        _stop_group(other)
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"error: output.dir: {run} is in use by another fedlora process" in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert {p.name for p in tmp_path.iterdir()} == {"run"}  # no workdir either


def test_deploy_an_earlier_runs_summary_is_not_this_runs_success(tmp_path):
    """``flwr run`` exits 0 when the ServerApp refuses the folder: a summary.json it did not write in this launch is a
    failure in one line naming the logs (and the ServerApp's error), never the old run's losses."""
    from types import SimpleNamespace

    from fedlora.flower.launch import FlowerRunError, RunHandle, summary_mark

    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"rounds": 2, "global_loss": {"before": 3.4, "after": 3.3}}')
    log = tmp_path / "run.log"
    log.write_text("Traceback (most recent call last):\n  File \"x\", line 1\nFileExistsError: output.dir: /x already holds files\n")
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)  # flwr run: exits 0, writes nothing
    handle = RunHandle(proc, out, log, SimpleNamespace(procs={"run-1": proc}, logs=tmp_path), frozenset(),
                       summary_mark(out / "summary.json"), time.time())
    with pytest.raises(FlowerRunError) as e:
        handle.wait(timeout=60)
    assert "\n" not in e.value.line and "exited 0 and the ServerApp left the summary.json of an earlier run" in e.value.line
    assert "(FileExistsError: output.dir: /x already holds files)" in e.value.line and str(log) in e.value.line

    (out / "summary.json").unlink()  # none at all
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    handle = RunHandle(proc, out, log, SimpleNamespace(procs={"run-1": proc}, logs=tmp_path), frozenset(), None, time.time())
    with pytest.raises(FlowerRunError, match="wrote no summary.json"):
        handle.wait(timeout=60)


CHILD = """
import subprocess, sys, time
grandchild = subprocess.Popen(['sleep', '300'], start_new_session=True)  # detached, as the SuperLink starts its SuperExec
open(sys.argv[1], 'a').write(f'{grandchild.pid}\\n')
time.sleep(300)
"""

LAUNCHER = """
import sys, time
from fedlora.flower.launch import LocalFederation
fed = LocalFederation(sys.argv[1], 2)
for name in ('superlink', 'node-0'):
    (fed.homes / name).mkdir(parents=True)  # FLWR_HOME, as Flower would make it
    p = fed._spawn(name, [sys.executable, '-c', sys.argv[3], sys.argv[2]], fed.homes / name)
    open(sys.argv[2], 'a').write(f'{p.pid}\\n')
print(fed.launch, flush=True)
time.sleep(300)
"""


def _pids(path: Path, n: int) -> list[int]:
    deadline = time.monotonic() + 60
    while len(pids := [int(x) for x in (path.read_text().split() if path.exists() else [])]) < n:
        assert time.monotonic() < deadline, pids
        time.sleep(0.05)
    return pids


def test_deploy_launchers_processes_and_theirs_die_with_it_even_by_sigkill(tmp_path):
    """A launcher killed with SIGKILL takes every process of its launch along, also those started in sessions of
    their own by its children (Flower's SuperExec): the watchdog kills what carries the launch's id. Its FLWR_HOMEs go too."""
    from fedlora.flower.processes import launch_processes

    pidfile = tmp_path / "pids"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "work"), str(pidfile), CHILD],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        launch = launcher.stdout.readline().strip()
        pids = _pids(pidfile, 4)  # two children, each with a detached grandchild
        assert all(_alive(p) for p in pids) and sorted(launch_processes(launch)) == sorted(pids)
        assert (tmp_path / "work" / "homes" / launch).is_dir()
        launcher.kill()  # SIGKILL: no handler, no finally
        launcher.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)], "processes of the launch outlived its launcher"
        assert launch_processes(launch) == []
        deadline = time.monotonic() + 10
        while (tmp_path / "work" / "homes").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (tmp_path / "work" / "homes").exists()
        # the children die of their parent-death signal or by the watchdog, whichever comes first; the detached grandchildren by the watchdog
        assert re.search(r"killed [234] of its processes", (tmp_path / "work" / "logs" / "watchdog.log").read_text())
    finally:
        if launcher.poll() is None:
            _stop_group(launcher)


def test_deploy_each_launch_has_its_own_flower_homes(tmp_path):
    """Two launches on one workdir (a resume after a resume) never share the CLI's config.toml: each has its own FLWR_HOMEs."""
    from fedlora.flower.launch import LocalFederation

    a, b = LocalFederation(tmp_path, 3), LocalFederation(tmp_path, 3)
    assert a.cli_home != b.cli_home and a.cli_home.is_relative_to(tmp_path / "homes") and a.launch != b.launch
    a._write_cli_config()
    b._write_cli_config()
    assert f"127.0.0.1:{a.port}" in (a.cli_home / "config.toml").read_text() and f"127.0.0.1:{b.port}" in (b.cli_home / "config.toml").read_text()
    a.stop()
    b.stop()
    assert not (tmp_path / "homes").exists()


LEADER = """
import os, subprocess, sys, time
plain = {"PATH": os.environ["PATH"]}  # no FEDLORA_LAUNCH: as Ray's agents, whose process title overwrites their environment
child = subprocess.Popen(["sleep", "300"], env=plain)  # a child of this process, in its session
middle = subprocess.Popen([sys.executable, "-c", "import subprocess; print(subprocess.Popen(['sleep', '300'], stdout=subprocess.DEVNULL).pid)"],
                          env=plain, stdout=subprocess.PIPE, text=True)  # starts an orphan in this session, then exits
orphan = int(middle.communicate()[0])
open(sys.argv[1], "a").write(f"{child.pid}\\n{orphan}\\n")
time.sleep(300)
"""

LAUNCHER_OF_LEADER = """
import sys, time
from fedlora.flower.launch import LocalFederation
fed = LocalFederation(sys.argv[1], 1)
(fed.homes / 'superlink').mkdir(parents=True)
fed._spawn('superlink', [sys.executable, '-c', sys.argv[3], sys.argv[2]], fed.homes / 'superlink')
print(fed.launch, flush=True)
time.sleep(300)
"""


def test_deploy_processes_that_lost_the_launch_id_die_with_the_launcher_too(tmp_path):
    """Ray's agents write their process title over their environment, so /proc shows no launch id for them, and
    they are orphans once the raylet is gone. The watchdog learns the sessions the launch's processes lead while the
    launch runs, and kills their members and the descendants of the launch's processes, tagged or not."""
    from fedlora.flower.processes import LOOK_EVERY, launch_processes

    pidfile = tmp_path / "pids"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER_OF_LEADER, str(tmp_path / "work"), str(pidfile), LEADER],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        launch = launcher.stdout.readline().strip()
        child, orphan = _pids(pidfile, 2)
        assert _alive(child) and _alive(orphan)
        tagged = launch_processes(launch)  # the leader, and its child as a descendant; the orphan only through its session
        assert child in tagged and orphan not in tagged and orphan in launch_processes(launch, sessions=set())
        time.sleep(LOOK_EVERY + 1.5)  # the watchdog has looked at the running launch at least once
        launcher.kill()  # SIGKILL: the leader dies of its parent-death signal, leaving both as orphans in its session
        launcher.wait()
        deadline = time.monotonic() + 20
        while (_alive(child) or _alive(orphan)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child) and not _alive(orphan), "processes of the launch without its id outlived the launcher"
    finally:
        if launcher.poll() is None:
            _stop_group(launcher)
        for pid in _pids(pidfile, 0) if pidfile.exists() else []:
            if _alive(pid):
                os.kill(pid, 9)


def test_deploy_a_run_the_serverapp_finished_is_a_success_even_when_flwr_run_fails_after_it(tmp_path, monkeypatch, capsys):
    """The SuperLink killed while the ServerApp writes the final adapter: ``flwr run`` fails at once, the ServerApp still
    writes final/ and summary.json before the teardown ends it. That summary is this launch's: the run is complete, so
    the launcher says so (exit 0, one warning line), not "continue it with --resume"; without it, the error line."""
    import json
    from types import SimpleNamespace

    import fedlora.flower.launch as launch
    from fedlora.flower.processes import FlowerRunError

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(TINY.read_text())
    writes = {"summary": True}

    class Federation:
        def __init__(self, *args, **kwargs):
            self.address, self.tls = "127.0.0.1:1", False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self, *args, **kwargs):
            if writes["summary"]:
                (out / "summary.json").write_text(json.dumps({"global_loss": {"before": 2.0, "after": 1.5}, "wire_bytes_up": 1,
                                                              "wire_bytes_down": 2, "lost": []}))
            raise FlowerRunError("flwr run exited 1 and the ServerApp wrote no summary.json", cause="the SuperLink was killed by SIGKILL")

    monkeypatch.setattr(launch, "LocalFederation", Federation)
    args = SimpleNamespace(tls=False, auth=False, threads_per_node=None, server_threads=None, overrides=[], resume=None, workdir=None)
    cfg = SimpleNamespace(federation=SimpleNamespace(rounds=2, method="flora"))
    assert launch._launch(args, cfg, TINY, 3, {}, None, out, tmp_path / "work", "fedlora deploy") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: flwr run exited (the SuperLink was killed by SIGKILL) as the ServerApp finished the run; the run folder is "
                   "complete (nothing to resume)"], err
    (out / "summary.json").unlink()
    writes["summary"] = False
    assert launch._launch(args, cfg, TINY, 3, {}, None, out, tmp_path / "work", "fedlora deploy") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: flwr run exited 1") and err[0].endswith(f"continue it with: fedlora deploy --resume {out}")
