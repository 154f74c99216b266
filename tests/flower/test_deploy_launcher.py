"""The launcher's process handling and argument checks, without Flower processes (fast)."""

from __future__ import annotations

import os
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
    with pytest.raises(SystemExit) as e:
        main(["--config", str(TINY), "--nodes", "2"])
    assert e.value.code == 2 and "federation.num_clients=3" in capsys.readouterr().err
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

    cpus = os.cpu_count() or 1
    assert cli(["simulate", str(TINY), "--client-cpus", "0"]) == 2
    assert "--client-cpus: 0 (accepted: more than 0" in capsys.readouterr().err
    assert cli(["simulate", str(TINY), "--client-cpus", str(cpus + 1)]) == 2
    assert f"at most the {cpus} CPUs here" in capsys.readouterr().err
    import torch

    gpus = torch.cuda.device_count()
    assert cli(["simulate", str(TINY), "--client-gpus", str(gpus + 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--client-gpus: {gpus + 1} (accepted: 0 to the {gpus} GPUs here" in err
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
