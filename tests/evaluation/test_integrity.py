"""final/ and exported adapters carry SHA-256s; a damaged copy is refused in one line, never exported as exact."""

from __future__ import annotations

import shutil

import pytest

from fedlora.cli import main
from fedlora.integrity import SUMS, damage, seal

from tests.evaluation.tiny_run import tiny_model_dir, tiny_run_dir


@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    run, _ = tiny_run_dir(root / "run", tiny_model_dir(root / "base"), "flora", [2, 1])
    seal(run / "final")  # as save_final does after writing the adapter and its card
    return run


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@pytest.mark.parametrize("how", ["flip", "cut", "remove"])
def test_export_refuses_a_damaged_final_adapter_in_one_line(sealed_run, tmp_path, capsys, how):
    run = _copy(sealed_run, tmp_path)
    weights = run / "final" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
        weights.write_bytes(bytes(data))
    elif how == "cut":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        weights.unlink()
        (run / "final" / "adapter_config.json").touch()
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "changed or damaged" in err.replace("\n", " ")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_intact_run_exports_and_the_export_is_sealed_too(sealed_run, tmp_path, capsys):
    run = _copy(sealed_run, tmp_path)
    assert damage(run / "final") is None
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert (out / SUMS).is_file() and damage(out) is None
    names = {line.split("  ")[1] for line in (out / SUMS).read_text().splitlines()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "fedlora_export.json"} <= names
    (out / "README.md").write_text("edited")
    assert "README.md does not match its SHA-256" in damage(out)


def test_an_unsealed_older_run_with_a_cut_adapter_is_one_line_not_a_traceback(sealed_run, tmp_path, capsys):
    run = _copy(sealed_run, tmp_path)
    (run / "final" / SUMS).unlink()
    weights = run / "final" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot be read" in err.replace("\n", " ")
