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


def _flip(path, at=-20):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["base-v2.safetensors", "state.json", "missing"])
def test_a_damaged_node_base_is_never_used_and_is_dropped_for_a_reset(tmp_path, gen, damaged):
    from fedlora.flower.state import NodeStateError

    folder = state_dir(tmp_path, 7, 0)
    save_state(folder, 2, {"m.q_proj": torch.randn(6, 5, generator=gen)})
    if damaged == "missing":
        (folder / "base-v2.safetensors").unlink()
    elif damaged == "state.json":  # still valid JSON, a digit changed: only the JSON's own digest tells
        (folder / "state.json").write_text((folder / "state.json").read_text().replace('"version": 2', '"version": 3'))
    else:
        _flip(folder / damaged)
    with pytest.raises(NodeStateError) as e:
        load_state(folder)
    assert NodeStateError.MARKER in str(e.value) and "\n" not in str(e.value)
    assert load_state(folder) == (0, {})  # dropped: the node is at W_0 and can take a reset from version 0


def test_a_damaged_kept_file_falls_back_to_the_earlier_round(tmp_path, gen):
    from fedlora.flower.state import load_kept, save_kept

    folder = state_dir(tmp_path, 7, 1)
    b3, b5 = torch.randn(4, 2, generator=gen), torch.randn(4, 2, generator=gen)
    save_kept(folder, 3, {"B": b3})
    save_kept(folder, 5, {"B": b5})
    assert torch.equal(load_kept(folder, 6)["B"], b5)
    _flip(folder / "kept-r5.safetensors")
    assert torch.equal(load_kept(folder, 6)["B"], b3)  # never the damaged one
    assert not (folder / "kept-r5.safetensors").exists()
    _flip(folder / "kept-r3.safetensors")
    assert load_kept(folder, 6) is None
