"""A client's base on node-local disk, the run/node config parsing, the app folder (no network)."""

from __future__ import annotations

import tomllib

import pytest
import torch

from fedlora.config import ConfigError
from fedlora.flower import APP_DIR
from fedlora.flower.settings import NodeSettings, RunSettings, resolve_config_path
from fedlora.flower.state import load_state, save_state, state_dir


def test_flower_client_state_survives_a_new_process_bit_for_bit(tmp_path, gen):
    """A node keeps (version, D_v): one dense tensor per adapted layer, whatever the number of rounds."""
    folder = state_dir(tmp_path, 123, 2)
    assert load_state(folder) == (0, {})
    save_state(folder, 0, {})  # a method that never merges: no tensor file at all
    assert sorted(p.name for p in folder.iterdir()) == ["state.json"]
    base = {"m.q_proj": torch.randn(6, 5, generator=gen, dtype=torch.float64), "m.v_proj": torch.randn(3, 5, generator=gen)}
    save_state(folder, 1, base)
    base = {n: t * 2 for n, t in base.items()}
    save_state(folder, 2, base)
    version, back = load_state(folder)
    assert version == 2 and set(back) == set(base) and all(torch.equal(back[n], base[n]) and back[n].dtype == base[n].dtype for n in base)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["base-v2.safetensors", "state.json"]  # the older tensor file is gone, no pickle anywhere


def test_flower_node_config_parsing():
    node = NodeSettings.from_node_config({"partition-id": 1, "num-partitions": 3, "rank": 8, "data-path": "/d.jsonl", "state-dir": "/s"})
    assert (node.partition, node.num_partitions, node.rank, node.data_path, str(node.state_root)) == (1, 3, 8, "/d.jsonl", "/s")
    assert NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 1}).rank is None
    with pytest.raises(ConfigError, match="partition-id"):
        NodeSettings.from_node_config({"num-partitions": 3})
    with pytest.raises(ConfigError, match="outside"):
        NodeSettings.from_node_config({"partition-id": 3, "num-partitions": 3})


def test_flower_run_config_parsing(tmp_path):
    rs = RunSettings.from_run_config({"config-path": "tiny", "overrides": "federation.rounds=1 'lora.ranks=[4, 2, 1]'", "output-dir": str(tmp_path / "r")})
    cfg = rs.load()
    assert cfg.federation.rounds == 1 and cfg.client_ranks() == [4, 2, 1] and rs.run_dir(cfg) == tmp_path / "r"
    assert resolve_config_path("").name == "default.yaml"
    with pytest.raises(ConfigError, match="absolute"):
        RunSettings.from_run_config({"config-path": "tiny"}).run_dir(cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": "runs/x"})}))
    with pytest.raises(ConfigError, match="relative"):
        resolve_config_path("configs/tiny.yaml")


def test_flower_app_folder_declares_every_run_config_key():
    """`flwr run --run-config` only overrides keys the app's pyproject declares."""
    project = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedlora.flower.server_app:app", "clientapp": "fedlora.flower.client_app:app"}
    declared = set(app["config"])
    read = {"config-path", "overrides", "output-dir", "round-timeout", "node-timeout", "checkpoint-deltas", "resume"}
    assert declared == read
    assert sorted(p.name for p in APP_DIR.iterdir() if p.name != "__pycache__") == ["pyproject.toml"]


def test_flower_node_state_is_keyed_by_the_run_folder_not_its_name(tmp_path):
    """Two runs in folders of the same name keep separate node bases; a restarted ServerApp finds its own."""
    from fedlora.flower.server_app import run_key

    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
    assert run_key(a) != run_key(b) and run_key(a) == run_key(tmp_path / "x" / ".." / "x" / "run")
    assert run_key(a).startswith("run-")
