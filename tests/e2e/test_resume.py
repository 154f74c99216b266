"""`fedlora run` killed with SIGKILL at several points and resumed ends bit-identical to an uninterrupted run.

The runs are real subprocesses on a tiny random Llama folder (tests/tiny_folder.py); a test-only
wrapper (tests/e2e/killed.py) kills the process at a named point: mid-round (after the first
client's reply is folded in), mid-checkpoint (tensors written, JSON not yet) and after a checkpoint.
The uninterrupted reference runs in the test process (same code, same torch thread count).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.cli import main
from tests.tiny_folder import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "120"}
FAST = ["federation.rounds=3", "train.local_steps=2", "train.lr=0.05", "train.max_length=64", "eval.max_examples=4", "data.max_examples=60"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def fedlora(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    """A real `fedlora` process with this process's torch thread count (float sums depend on it)."""
    env = {**ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = ["-m", "tests.e2e.killed", kill_at] if kill_at else ["-m", "fedlora.cli"]
    return subprocess.run([sys.executable, *command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)  # a hang guard


def run_args(model_dir: Path, method: str, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return ["run", str(ROOT / "configs" / "tiny.yaml"), f"model.path={model_dir}", f"federation.method={method}", f"output.dir={out}", *FAST, *extra]


def without_wall_times(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        m.pop("wall_s")
        m.pop("rss_mb", None)  # a measurement of the process, like the wall time
    return lines


def assert_same_run(a: Path, b: Path) -> None:
    assert without_wall_times(a) == without_wall_times(b)
    ta, tb = load_file(a / "final" / "adapter_model.safetensors"), load_file(b / "final" / "adapter_model.safetensors")
    assert set(ta) == set(tb) and all(ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]) for k in ta)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    for key in ("global_loss", "client_loss", "bytes_up", "bytes_down", "agg_noise_mean", "init_noise_mean"):
        assert sa[key] == sb[key], key


@pytest.mark.parametrize(("method", "kills", "extra"), [
    ("flora", ["mid-checkpoint:1", "mid-round:2"], ()),
    ("fedplora", ["after-checkpoint:1"], ()),
    ("flora", ["mid-round:2"], ("train.precision=bfloat16",)),
    ("ffa", ["mid-round:2"], ("lora.rank=2", "privacy.mode=client", "privacy.target_epsilon=8", "privacy.clip=0.5")),  # the noise's draws too
])
def test_killed_and_resumed_run_is_bit_identical(model_dir, tmp_path, method, kills, extra):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(run_args(model_dir, method, whole, extra)) == 0  # the uninterrupted reference, in this process

    proc = fedlora(run_args(model_dir, method, broken, extra), kill_at=kills[0])
    for i, point in enumerate(kills):
        assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: {proc.stderr[-2000:]}"
        assert not (broken / "final").exists()
        if point == "mid-checkpoint:1":  # round 1 recorded, its checkpoint half-written in a hidden temporary folder
            assert [json.loads(x)["round"] for x in (broken / "metrics.jsonl").read_text().splitlines()] == [0, 1]
            folders = sorted(p.name for p in (broken / "checkpoints").iterdir())
            assert folders[0].startswith(".round-0001.tmp-") and folders[1:] == ["round-0000"]
        nxt = kills[i + 1] if i + 1 < len(kills) else None
        proc = fedlora(["run", "--resume", str(broken)], kill_at=nxt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(whole, broken)
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["round-0002", "round-0003"]  # the last two, nothing half-written
    if "privacy.mode=client" in extra:  # ε after every round, from the accountant, written once per round
        eps = [m["privacy"]["epsilon"] for m in without_wall_times(broken)[1:]]
        assert len(eps) == 3 and eps == sorted(eps) and eps[-1] <= 8
    if "train.precision=bfloat16" in extra:  # bfloat16 matrix multiplies: the loss still falls, and the run is not the float32 one
        plain = tmp_path / "float32"
        assert main(run_args(model_dir, method, plain)) == 0
        s16, s32 = (json.loads((r / "summary.json").read_text())["global_loss"] for r in (whole, plain))
        assert s16["after"] < s16["before"] and s16["after"] != s32["after"] and abs(s16["after"] - s32["after"]) < 0.05 * s32["before"]


def test_resume_refuses_a_changed_setting_in_one_line(tmp_path, capfd):
    from fedlora.config import load_config, to_yaml
    from fedlora.app.run_dir import resume_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config(ROOT / "configs" / "tiny.yaml", [])))
    assert resume_config(run, None, ["output.save_final=false"]).output.save_final is False  # output.* may change
    assert main(["run", "--resume", str(run), "federation.rounds=7"]) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert "federation.rounds=7 differs from 2" in err and "only output.* may change" in err
    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "holds no config.yaml" in capfd.readouterr().err


def test_a_run_folder_belongs_to_one_process_and_a_finished_run_resumes_to_nothing(model_dir, tmp_path, capfd):
    """A second process on a held run folder gets one line; `--resume` of a finished run changes no file;
    `fedlora data` refuses a run's folder."""
    import multiprocessing

    from fedlora.app.run_dir import lock
    from fedlora.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    held = lock(run)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        err = pool.apply(_try_lock, (str(run),))
    assert err.startswith("output.dir: ") and "in use by another fedlora process" in err
    held.close()

    done = tmp_path / "done"
    assert main(run_args(model_dir, "flora", done)) == 0
    before = {p: p.read_bytes() for p in done.rglob("*") if p.is_file()}
    assert main(["run", "--resume", str(done)]) == 0
    assert {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == before
    capfd.readouterr()
    assert main(["data", str(ROOT / "configs" / "tiny.yaml"), f"model.path={model_dir}", f"output.dir={done}"]) == 2
    assert "holds a run" in capfd.readouterr().err
    assert {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == before


def _try_lock(path):
    from pathlib import Path

    from fedlora.app.run_dir import lock

    try:
        lock(Path(path))
    except Exception as e:  # noqa: BLE001 - the message is what the test reads
        return str(e)
    return "locked"


def _as_in_a_terminal() -> None:
    """SIGINT at its default, as in a user's terminal, whatever this suite inherited: a suite started in the background
    (``nohup make test &``) ignores SIGINT, its children inherit that, and Python then installs no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_in_one_line_that_names_resume_and_the_run_continues(model_dir, tmp_path):
    import time

    out = tmp_path / "run"
    args = [*run_args(model_dir, "flora", out), "federation.rounds=8"]
    env = {**ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "fedlora.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_in_a_terminal)
    deadline = time.time() + 900  # generous: a busy machine (another deployment beside the suite) is slow, not wrong
    lines = 0
    while time.time() < deadline and proc.poll() is None and lines < 3:
        lines = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").is_file() else 0
        time.sleep(0.02)
    assert lines >= 3, f"the run wrote {lines} lines of metrics.jsonl before the deadline (exit code {proc.poll()})"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and f"fedlora run --resume {out}" in last
    done = fedlora(["run", "--resume", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert [m["round"] for m in without_wall_times(out)] == list(range(9))
