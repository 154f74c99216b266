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


def test_a_final_folder_is_replaced_whole_or_not_at_all(tmp_path):
    """``write_folder``: the run's (and a node's) ``final/`` is written aside and renamed into place; a write that dies
    midway leaves the previous ``final/`` (or none) and a hidden leftover, which the next write removes."""
    from fedlora.integrity import write_folder

    final = tmp_path / "final"

    def half(folder):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_text("half")
        raise KeyboardInterrupt  # killed before the card and the checksums

    with pytest.raises(KeyboardInterrupt):
        write_folder(final, half)
    assert not final.exists() and [p.name.startswith(".final.tmp-") for p in tmp_path.iterdir()] == [True]

    def whole(text):
        def write(folder):
            folder.mkdir()
            (folder / "adapter_model.safetensors").write_text(text)
            (folder / "SHA256SUMS").write_text("sums")
        return write

    write_folder(final, whole("one"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"] and (final / "adapter_model.safetensors").read_text() == "one"
    with pytest.raises(KeyboardInterrupt):
        write_folder(final, half)
    assert (final / "adapter_model.safetensors").read_text() == "one"  # the previous one, whole
    write_folder(final, whole("two"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"] and (final / "adapter_model.safetensors").read_text() == "two"
    write_folder(final, lambda folder: None)  # nothing written (adapters that stay with the clients): final/ untouched
    assert (final / "adapter_model.safetensors").read_text() == "two"


def test_fedlora_runs_final_save_goes_through_write_folder(tmp_path, monkeypatch):
    """The simulator's ``save_final`` (fedlora run, compare, the Flower ServerApp) is killed after the adapter and
    before its card: the previous final/ stays whole, as the Flower side's always did."""
    from types import SimpleNamespace

    import fedlora.app.final as final_mod

    def adapter(host, delta, targets, folder, base):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_model.safetensors").write_text("new")
        return 2

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(final_mod, "save_adapter", adapter)
    monkeypatch.setattr(final_mod, "write_card", killed)
    method = SimpleNamespace(keeps=False, personal=False, global_delta=lambda: {})
    server = SimpleNamespace(exp=SimpleNamespace(cfg=SimpleNamespace(lora=SimpleNamespace(target_modules=["q"])), method=method,
                                                 host=None, model_dir=tmp_path), kept={})
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "adapter_model.safetensors").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        final_mod.save_final(server, final)
    assert (final / "adapter_model.safetensors").read_text() == "old"
    monkeypatch.setattr(final_mod, "write_card", lambda *a, **k: None)
    final_mod.save_final(server, final)
    assert (final / "adapter_model.safetensors").read_text() == "new" and (final / SUMS).is_file()
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]

