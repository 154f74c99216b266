"""A method from outside the package runs in the simulator like one of fedlora's, on the tiny
random Llama: named by a dotted path, or by the name its entry point gives it."""

import copy

from fedlora.methods import REGISTRY

from tests.methods.outside import fake_entry_points
from tests.sim.test_simulation import _experiment, _run


def _losses(records):
    return [r["eval"]["global"]["loss"] for r in records]


def test_a_dotted_path_method_runs_as_its_parent_does(tiny_llama, outside):
    """FLoRA under another name from a temporary module: the same rounds, bit for bit, as fedlora's FLoRA."""
    fresh = copy.deepcopy(tiny_llama)  # a merging run leaves its model at the merged base
    ours = _run(_experiment(tiny_llama, f"{outside}:Unregistered", (4, 2, 1)))
    assert [r["round"] for r in ours] == [0, 1, 2] and REGISTRY["my-unregistered"].__module__ == outside
    assert ours[0]["method"] == f"{outside}:Unregistered" and all(r["agg_noise"] < 1e-6 for r in ours[1:])
    reference = _run(_experiment(fresh, "flora", (4, 2, 1)))
    assert _losses(ours) == _losses(reference) and ours[-1]["bytes_up"] == reference[-1]["bytes_up"]


def test_an_entry_point_method_runs_by_its_name(tiny_llama, outside, monkeypatch):
    fake_entry_points(monkeypatch, **{"my-unregistered": f"{outside}:Unregistered"})
    records = _run(_experiment(tiny_llama, "my-unregistered", (4, 2, 1)))
    assert [r["round"] for r in records] == [0, 1, 2] and records[-1]["eval"]["global"]["loss"] < records[0]["eval"]["global"]["loss"]
