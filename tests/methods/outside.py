"""A researcher's method package written into a temporary folder on sys.path, for the tests of
methods from outside fedlora (a dotted path, or an entry point of the group ``fedlora.methods``)."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest

from fedlora.methods import REGISTRY
from fedlora.methods.registry import GROUP

MODULE = "my_fedlora_methods"

SOURCE = '''
"""A method of one's own: FLoRA under another name, registered next to it (no cycle)."""

from fedlora.methods.registry import register  # first: importable from a method module without a cycle
from fedlora.methods.fedit import FedIT
from fedlora.methods.flora import FLoRA


@register
class MyFLoRA(FLoRA):
    name = "my-flora"
    summary = "FLoRA, from a package outside fedlora."


class Unregistered(FLoRA):
    name = "my-unregistered"
    summary = "Registered when a dotted path or an entry point names it."


class OneRank(FedIT):
    name = "my-fedit"
    summary = "FedIT under another name: declares one rank for every client, as FedIT does."


class SameName(FLoRA):
    summary = "Inherits FLoRA's name: refused."


class BadRanks(FLoRA):
    name = "my-bad-ranks"
    summary = "A declaration outside its accepted values."
    ranks = "two"


not_a_class = 3
'''


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """The module's name, importable; the registry and sys.modules restored afterwards."""
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(REGISTRY)
    yield MODULE
    REGISTRY.clear()
    REGISTRY.update(before)
    sys.modules.pop(MODULE, None)


def fake_entry_points(monkeypatch, **points: str) -> None:
    """Installed entry points of the group ``fedlora.methods``: name → ``module:Class``, as a package's metadata would list them."""
    eps = [importlib.metadata.EntryPoint(name=name, value=value, group=GROUP) for name, value in points.items()]
    real = importlib.metadata.entry_points

    def entry_points(**select):
        return importlib.metadata.EntryPoints(eps) if select.get("group") == GROUP else real(**select)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
