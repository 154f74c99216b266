"""`fedlora run configs/tiny.yaml` end to end on the real SmolLM2, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "120"}


def fedlora(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=1800)  # a guard against a hang, not a speed test


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("work")
    proc = fedlora("run", str(ROOT / "configs" / "tiny.yaml"), "output.dir=run", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "run"


@pytest.mark.slow
def test_run_folder_has_every_file_and_key(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.yaml", "partition.json", "metrics.jsonl", "summary.json", "final"} <= names
    from fedlora.integrity import damage

    assert (tiny_run / "final" / "SHA256SUMS").is_file() and damage(tiny_run / "final") is None  # sealed: export can tell a damaged copy
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["federation"]["method"] == "flora" and cfg["lora"]["ranks"] == [4, 2, 1]

    part = json.loads((tiny_run / "partition.json").read_text())
    assert len(part["clients"]) == 3 and part["partition"] == "dirichlet"
    seen = [i for c in part["clients"] for i in c["train_indices"] + c["test_indices"]]
    assert len(seen) == len(set(seen)) and not set(seen) & set(part["global_test_indices"])

    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1, 2]
    for m in lines:
        assert {"round", "method", "clients", "eval", "wall_s"} <= m.keys()
        assert set(m["eval"]["clients"]) == {"0", "1", "2"} and m["eval"]["global"]["loss"] > 0
    for m in lines[1:]:
        assert {"agg_noise", "init_noise", "bytes_up", "bytes_down"} <= m.keys()
        assert [c["id"] for c in m["clients"]] == [0, 1, 2]
        for c in m["clients"]:
            assert {"id", "rank", "num_examples", "train_loss", "bytes_up", "bytes_down"} <= c.keys()
            # q_proj 576×576 and v_proj 192×576 in 30 layers, float32: r_k (d_in + d_out) · 4 bytes
            assert c["bytes_up"] == 4 * c["rank"] * 30 * ((576 + 576) + (576 + 192))
        assert m["agg_noise"] < 1e-6 and m["init_noise"] == 0.0  # FLoRA: exact up to float32 round-off
    # round 2: every client downloads the round-1 stack of rank 4+2+1
    assert all(c["bytes_down"] == 4 * 7 * 30 * (1152 + 768) for c in lines[2]["clients"])

    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["global_loss"]["after"] < summary["global_loss"]["before"]
    from importlib.metadata import version

    assert summary["fedlora_version"] == version("fedlora")
    if (Path(__file__).resolve().parents[2] / ".git").exists():  # run from a checkout: its HEAD
        assert len(summary["commit"]) == 40 and int(summary["commit"], 16) >= 0
    assert summary["global_loss"]["before"] == lines[0]["eval"]["global"]["loss"]
    assert summary["bytes_up"] == sum(c["bytes_up"] for m in lines[1:] for c in m["clients"])

    adapter = load_file(tiny_run / "final" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 60 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in adapter)
    config = json.loads((tiny_run / "final" / "adapter_config.json").read_text())
    assert config["r"] == 14 and config["lora_alpha"] == 14  # two stacks of rank 7, scale 1


@pytest.mark.slow
def test_loss_falls_round_by_round(tiny_run):
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["eval"]["global"]["loss"] for m in lines]
    assert losses[2] < losses[1] < losses[0]


def run_cli(*args: str, cwd: Path, monkeypatch, capfd) -> tuple[int, str, str]:
    """``fedlora ARGS`` in this process (exit code, stdout, stderr), from ``cwd``."""
    from fedlora.cli import main

    monkeypatch.chdir(cwd)
    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def test_bad_override_exits_2_with_one_line(tmp_path, monkeypatch, capfd):
    code, _, err = run_cli("run", str(ROOT / "configs" / "tiny.yaml"), "lora.ranks=[4,2]", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert code == 2
    msg = err.strip()
    assert msg.startswith("error: lora.ranks: 2 ranks [4, 2] for federation.num_clients=3") and "\n" not in msg
    assert not any(tmp_path.iterdir())  # nothing written before the config is valid


def test_overrides_without_a_config_apply_to_the_default(tmp_path, monkeypatch, capfd):
    code, _, err = run_cli("run", "federation.rounds=0", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert code == 2 and err.strip().startswith("error: federation.rounds:")


def test_methods_command_lists_every_method_and_option(tmp_path, monkeypatch, capfd):
    from fedlora.methods import REGISTRY

    code, out, _ = run_cli("methods", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert code == 0
    for name, cls in REGISTRY.items():
        assert name in out
        for option in cls.options:
            assert option in out


def test_data_command_prints_the_split_and_writes_a_heatmap(tmp_path, monkeypatch, capfd):
    code, out, err = run_cli("data", str(ROOT / "configs" / "tiny.yaml"), "data.partition=pathological", "data.classes_per_client=7", "output.dir=split",
                             cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert code == 0, err[-2000:]
    png = tmp_path / "split" / "partition.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    info = json.loads((tmp_path / "split" / "partition.json").read_text())
    assert len(info["clients"]) == 3 and all(len(c["categories"]) == 7 for c in info["clients"])
    assert "client" in out and "pathological" in out


def test_version_flag_prints_the_installed_version(capsys):
    from importlib.metadata import version

    from fedlora.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fedlora {version('fedlora')}"


@pytest.mark.slow
def test_final_adapter_says_what_trained_it_and_every_file_is_group_readable(tiny_run):
    import stat

    card = (tiny_run / "final" / "README.md").read_text()
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    before, after = lines[0]["eval"]["global"]["loss"], lines[-1]["eval"]["global"]["loss"]
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "method `flora`, 3 clients with LoRA ranks [4, 2, 1]" in card and "2 of 2 rounds" in card
    assert f"| global test loss | {before:.4f} | {after:.4f} |" in card and "chatterbot" in card
    assert "[More Information Needed]" not in card  # PEFT's blank template is gone
    mask = os.umask(0)
    os.umask(mask)
    for f in [p for p in tiny_run.rglob("*") if p.is_file()]:
        assert stat.S_IMODE(f.stat().st_mode) & 0o666 == 0o666 & ~mask, f  # as the umask says (safetensors alone writes 0600)
