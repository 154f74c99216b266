"""Checks that need neither data nor model run first: a missing data file is one line before the heavy imports."""

from __future__ import annotations

import subprocess
import sys


def test_a_missing_data_file_is_refused_before_torch_is_imported():
    code = ("import sys; from fedlora.config import load_config, packaged_config, ConfigError; from fedlora.app.preflight import preflight\n"
            "cfg = load_config(packaged_config('tiny'), ['data.source=/no/such/dolly.jsonl'])\n"
            "try:\n    preflight(cfg)\nexcept ConfigError as e:\n    print(e); print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert out[0].startswith("data.source: file not found: /no/such/dolly.jsonl (accepted: a built-in corpus name")
    assert out[1] == "False"


def test_a_run_folder_that_cannot_take_its_lock_is_one_line(tmp_path, monkeypatch):
    import builtins
    import errno

    import pytest

    from fedlora.app.run_dir import lock
    from fedlora.config import ConfigError

    real = builtins.open

    def read_only(path, *args, **kwargs):  # as on a read-only file system (root may write anywhere else)
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(ConfigError, match=r"^output\.dir: cannot write .*\.lock \(Read-only file system\) \(accepted: a folder you can write to\)$"):
        lock(tmp_path)
