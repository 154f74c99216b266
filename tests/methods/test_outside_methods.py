"""Methods from outside the package: a dotted path ``module:Class`` or an entry point of the group
``fedlora.methods``, registered under the class's ``name``; every bad value is one MethodError line
naming the setting, the value and what is accepted (float64)."""

import subprocess
import sys

import pytest
import torch

from fedlora.methods import REGISTRY, MethodError, Setup, available, build_method, method_class, register
from fedlora.methods.flora import FLoRA
from fedlora.methods.registry import needs_one_rank

from tests.methods.outside import fake_entry_points

SETUP = Setup({"l": (6, 5)}, {0: 3, 1: 1}, {0: 2.0, 1: 2.0}, seed=0, dtype=torch.float64)


def test_a_dotted_path_imports_registers_and_builds_the_class(outside):
    method = build_method(f"{outside}:Unregistered", SETUP)
    cls = type(method)
    assert cls.__name__ == "Unregistered" and method.name == "my-unregistered" and REGISTRY["my-unregistered"] is cls
    assert build_method("my-unregistered", SETUP).name == "my-unregistered"  # by its name too, once loaded
    assert method_class(f"{outside}:Unregistered") is cls  # again: the same class, no duplicate error
    assert not needs_one_rank(f"{outside}:Unregistered", [3, 1])  # its declarations are read like the package's


def test_register_next_to_the_method_registers_on_import(outside):
    __import__(outside)
    assert REGISTRY["my-flora"].__module__ == outside and issubclass(REGISTRY["my-flora"], FLoRA)


def test_a_method_module_can_import_the_registry_first_without_a_cycle(outside, tmp_path):
    """A researcher's module imports ``fedlora.methods.registry`` before anything else of fedlora (a fresh interpreter)."""
    code = f"import {outside}; from fedlora.methods import REGISTRY; print(sorted(REGISTRY)[:3], REGISTRY['my-flora'].__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1] == "MyFLoRA", out.stderr


def test_an_entry_point_makes_a_plain_name_work(outside, monkeypatch):
    fake_entry_points(monkeypatch, **{"my-unregistered": f"{outside}:Unregistered"})
    assert "my-unregistered" not in REGISTRY
    assert build_method("my-unregistered", SETUP).name == "my-unregistered"
    assert "my-unregistered" in available()


def test_available_loads_every_entry_point_after_the_packages_methods(outside, monkeypatch):
    fake_entry_points(monkeypatch, **{"my-unregistered": f"{outside}:Unregistered"})
    package = list(REGISTRY)
    assert list(available()) == [*package, "my-flora", "my-unregistered"]  # the module registers its own on import


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nosuch_pkg.mod:X", "federation.method: 'nosuch_pkg.mod:X': cannot import nosuch_pkg.mod: No module named 'nosuch_pkg' (accepted: a registered name"),
        ("{m}:Missing", "federation.method: '{m}:Missing': {m} has no Missing (accepted: "),
        ("{m}:not_a_class", "federation.method: '{m}:not_a_class' is 3, not a method class (accepted: a subclass of fedlora.methods.Method)"),
        ("{m}:SameName", "federation.method: '{m}:SameName' is named 'flora', the name of fedlora.methods.flora.FLoRA (accepted: a class with a name of its own)"),
        ("{m}:BadRanks", "federation.method: '{m}:BadRanks': method 'my-bad-ranks' declares ranks = 'two' (accepted: one, any)"),
        ("my pkg:X", "federation.method: invalid value 'my pkg:X' (accepted: a registered name, or package.module:Class importable here)"),
        ("{m}:", "federation.method: invalid value '{m}:' (accepted: "),
        ("florra", "federation.method: unknown value 'florra' (did you mean 'flora'? accepted: "),
    ],
)
def test_bad_values_are_one_line_naming_setting_value_and_accepted(outside, value, message):
    with pytest.raises(MethodError) as e:
        build_method(value.format(m=outside), SETUP)
    text = str(e.value)
    assert text.startswith(message.format(m=outside)) and "\n" not in text, text
    assert "flora" not in REGISTRY or REGISTRY["flora"] is FLoRA  # a refused class never displaces a method


def test_a_bad_entry_point_is_one_line(outside, monkeypatch):
    fake_entry_points(monkeypatch, **{"wrong-name": f"{outside}:Unregistered", "gone": "nosuch_pkg:X"})
    with pytest.raises(MethodError, match=r"^federation\.method: entry point wrong-name = '.*:Unregistered' \(group fedlora\.methods\) loads a method named 'my-unregistered' \(accepted: the entry point named as its method"):
        build_method("wrong-name", SETUP)
    with pytest.raises(MethodError, match=r"^federation\.method: entry point gone = 'nosuch_pkg:X' \(group fedlora\.methods\) cannot be loaded: ModuleNotFoundError"):
        build_method("gone", SETUP)
    with pytest.raises(MethodError, match=r"accepted: .*gone.*wrong-name.*, or package\.module:Class\)$"):  # the installed names are offered
        build_method("nope", SETUP)


def test_register_refuses_a_second_class_under_a_taken_name_and_keeps_the_same_one():
    assert register(FLoRA) is FLoRA and REGISTRY["flora"] is FLoRA

    class Other(FLoRA):
        summary = "another class named flora"

    with pytest.raises(ValueError, match=r"method name 'flora' of .*Other is already registered by fedlora\.methods\.flora\.FLoRA"):
        register(Other)
    assert REGISTRY["flora"] is FLoRA


def test_fedlora_methods_lists_an_installed_entry_points_method_with_its_declarations(outside, monkeypatch, capsys):
    from fedlora.cli import main

    fake_entry_points(monkeypatch, **{"my-fedit": f"{outside}:OneRank"})
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["methods"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "│" in line]
    first = next(i for i, line in enumerate(rows) if line.split("│")[1].strip() == "my-fedit")
    cells = ["".join(line.split("│")[c] for line in rows[first:first + 3]) for c in (2, 3)]
    assert f"from {outside}" in cells[0] and "ranks: one" in cells[1] and "sums_only" in cells[1]
