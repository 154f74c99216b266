"""`output.trackers`: every round's metrics in TensorBoard, MLflow and W&B files, offline, read back with each tool's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.cli import main
from tests.tiny_folder import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trackers")
    model = save_tiny_model(root / "model")
    run = root / "run"
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), f"model.path={model}", f"output.dir={run}", "output.trackers=[tensorboard,mlflow,wandb]",
                 "train.local_steps=1", "data.max_examples=30", "eval.max_examples=4", "output.save_final=false"]) == 0
    return run


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_every_round_as_metrics_jsonl_does(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "tensorboard"))
    events.Reload()
    lines = _metrics(tracked)
    loss = [(e.step, e.value) for e in events.Scalars("global/loss")]
    assert [s for s, _ in loss] == [0, 1, 2]
    assert [v for _, v in loss] == pytest.approx([m["eval"]["global"]["loss"] for m in lines], rel=1e-6)  # float32 in the event file
    assert [e.value for e in events.Scalars("round/bytes_up")] == [m["bytes_up"] for m in lines[1:]]
    assert {"client_0/loss", "client_2/train_loss", "round/agg_noise", "round/wall_s"} <= set(events.Tags()["scalars"])


def test_mlflow_store_holds_one_run_named_after_the_folder_with_config_and_metrics(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    assert run.info.run_name == tracked.name and run.info.status == "FINISHED"
    assert run.data.params["federation.method"] == "flora" and run.data.params["lora.ranks"] == "[4, 2, 1]"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "global.loss"))
    assert history == [(m["round"], m["eval"]["global"]["loss"]) for m in _metrics(tracked)]


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (LevelDB log format after a 7-byte W&B header, 32 KiB blocks)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
    return out


def test_wandb_offline_run_holds_the_config_and_every_round(tracked):
    from wandb.proto import wandb_internal_pb2

    (log,) = (tracked / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for raw in _wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
        elif record.WhichOneof("record_type") == "run":
            config.update({item.key: item.value_json for item in record.run.config.update})
    assert sorted(history) == [0, 1, 2]
    assert [history[m["round"]]["global/loss"] for m in _metrics(tracked)] == [m["eval"]["global"]["loss"] for m in _metrics(tracked)]
    assert json.loads(config["federation.method"]) == "flora"


def test_a_tracker_that_is_not_installed_is_one_line_before_any_work(tmp_path, capfd, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), f"output.dir={tmp_path / 'run'}", "output.trackers=[wandb]"]) == 2
    (line,) = [x for x in capfd.readouterr().err.splitlines() if x.startswith("error:")]
    assert "output.trackers: 'wandb' needs the wandb package" in line and 'pip install -e ".[trackers]"' in line
    assert not (tmp_path / "run").exists()


def test_trackers_start_only_once_a_resume_is_verified_and_replay_the_kept_rounds(tmp_path, capfd):
    """A resume refused for damaged checkpoints writes no tracker file; an accepted one logs the kept rounds, then the new."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = save_tiny_model(tmp_path / "model")
    run = tmp_path / "run"
    base = ["train.local_steps=1", "data.max_examples=30", "eval.max_examples=4", "output.save_final=false"]
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), f"model.path={model}", f"output.dir={run}", *base]) == 0
    (run / "summary.json").unlink()
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("rounds: 2\n", "rounds: 3\n"))  # what a kill in round 3 of 3 leaves
    shutil.copytree(run / "checkpoints", tmp_path / "intact")
    for state in (run / "checkpoints").glob("round-*/state.safetensors"):
        data = state.read_bytes()
        state.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    capfd.readouterr()
    assert main(["run", "--resume", str(run), "output.trackers=[tensorboard]"]) == 2
    assert "no intact checkpoint" in capfd.readouterr().err and not (run / "tensorboard").exists()
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(tmp_path / "intact", run / "checkpoints")
    assert main(["run", "--resume", str(run), "output.trackers=[tensorboard]"]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("global/loss")] == [0, 1, 2, 3]  # rounds 0-2 kept and replayed, round 3 new


def test_a_tracker_path_in_the_way_is_one_line_before_any_round_is_retrained(tmp_path, capfd):
    import shutil

    model = save_tiny_model(tmp_path / "model")
    run = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), f"model.path={model}", f"output.dir={run}", "train.local_steps=1",
                 "data.max_examples=30", "eval.max_examples=4", "output.save_final=false"]) == 0
    shutil.rmtree(run / "checkpoints" / "round-0002")  # as if killed before round 2's checkpoint: a resume redoes round 2
    (run / "summary.json").unlink()
    (run / "tensorboard").write_text("a file where TensorBoard's folder goes")
    before = (run / "metrics.jsonl").read_bytes()
    capfd.readouterr()
    assert main(["run", "--resume", str(run), "output.trackers=[tensorboard]"]) == 2
    (line,) = [x for x in capfd.readouterr().err.splitlines() if x.startswith("error:")]
    assert f"output.trackers: 'tensorboard' writes to {run / 'tensorboard'}, which is a file" in line
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing was retrained or cut back
