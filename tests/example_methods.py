"""The example package of methods from outside fedlora (examples/fedlora-example-methods), installed for the suite.

The package is pip-installed, entry points and all, into a folder of its own that goes on
``sys.path`` and on ``PYTHONPATH`` (for the ``fedlora`` processes the tests start, Flower's
SuperNodes included), before any test module is collected. Its methods then register like the
package's own, and every test that takes ``sorted(REGISTRY)`` covers them with nothing to edit.
It builds offline with the environment's own setuptools (in the dev extra).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fedlora-example-methods"
PACKAGE = "fedlora_example_methods"
NAMES = ("server-momentum", "slot-mean", "mixed-personal")  # the names its pyproject.toml gives its entry points


def install() -> Path:
    """Install the example package into a fresh folder (deleted at exit) and make it importable here and in subprocesses."""
    work = Path(tempfile.mkdtemp(prefix="fedlora-example-methods."))
    atexit.register(shutil.rmtree, work, True)
    source, site = work / "source", work / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))  # builds nothing into the repository
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
        check=True, stdout=subprocess.DEVNULL,
    )
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    from fedlora.methods import available

    available()  # registers every installed entry point's method, the example's among them
    return site
