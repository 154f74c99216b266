"""Which package may import which (architecture.md §2c), read from the sources' import statements.

The methods and the round know nothing of files, commands or transports; Flower's modules reach the
run folder (``fedlora.app``) only from their entry points: the ServerApp and the ``fedlora deploy``
launcher. A third transport then reuses everything below them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedlora"

FORBIDDEN = {  # package → what none of its modules may import (at any depth of the module, lazily or not)
    "ops": ("fedlora.methods", "fedlora.federation", "fedlora.app", "fedlora.flower", "fedlora.sim", "fedlora.cli", "fedlora.study"),
    "methods": ("fedlora.federation", "fedlora.app", "fedlora.flower", "fedlora.sim", "fedlora.cli", "fedlora.study", "fedlora.train"),
    "federation": ("fedlora.app", "fedlora.flower", "fedlora.sim", "fedlora.cli", "fedlora.study"),
    "flower": ("fedlora.app", "fedlora.cli", "fedlora.study", "fedlora.sim"),
}
ENTRY_POINTS = {"flower/server_app.py", "flower/launch.py"}  # Flower's ServerApp and the deploy launcher: they own the run folder


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package):
    found = []
    for path in sorted((SRC / package).rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in ENTRY_POINTS:
            continue
        found += [f"{rel}: {name}" for name in sorted(_imports(path)) if name.startswith(FORBIDDEN[package])]
    assert not found, found


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from fedlora.app import checkpoint\n")
    assert "fedlora.app" in _imports(tmp_path / "m.py")
