"""The aggregation seam (federation/seam.py): every sums_only method's round goes through declared contributions,
and a wrapper there acts on contributions and sums only (float64)."""

from __future__ import annotations

import pytest
import torch

from fedlora.config import ConfigError, load_config, packaged_config
from fedlora.federation.round import ServerRound, bounds_of
from fedlora.federation.seam import Contribution, Wrapper, WrapperError
from fedlora.federation.wrappers import ClipEach, build_wrappers
from fedlora.methods import REGISTRY, build_method
from fedlora.methods.state import state_of
from fedlora.methods.sums import Sums
from tests.sim.test_server_round import _replies, _setup

SUMS = sorted(n for n, cls in REGISTRY.items() if cls.sums_only)
OTHERS = sorted(n for n, cls in REGISTRY.items() if not cls.sums_only)
COUNTS = [30, 10, 25, 5]


def _state(method) -> dict[str, torch.Tensor]:
    """Every tensor of the method's state, flat by path."""
    out = {}

    def walk(path, obj):
        if isinstance(obj, torch.Tensor):
            out[path] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{path}.{k}", v)
        elif hasattr(obj, "B") and hasattr(obj, "A"):
            walk(path + ".B", obj.B)
            walk(path + ".A", obj.A)

    for path, obj in state_of(method).items():
        walk(path, obj)
    return out


def _round(name, wrappers, gen_seed=0, counts=COUNTS):
    method = build_method(name, _setup(name, len(counts)))
    gen = torch.Generator().manual_seed(gen_seed)
    replies = _replies(method, 1, gen, counts)
    server = ServerRound(method, bounds_of(method, 1e6), 1, name, list(range(len(counts))), 1, method.global_delta(), wrappers=wrappers)
    for a in replies:
        server.receive(a)
    return method, server.finish(lambda *_: None), replies


def test_the_sums_only_declaration_is_the_sums_class():
    assert SUMS and all(issubclass(REGISTRY[n], Sums) for n in SUMS) and not any(issubclass(REGISTRY[n], Sums) for n in OTHERS)


@pytest.mark.parametrize("name", SUMS)
def test_clipping_at_the_seam_is_the_hand_computed_clipped_mean_for_every_sums_only_method(name):
    """Σ_k w_k min(1, C/‖T_k‖) T_k / Σ_k w_k, computed here from each client's declared contribution, is the state."""
    plain, entry_plain, _ = _round(name, [])
    loose, entry_loose, _ = _round(name, [ClipEach(max_norm=1e12)])
    assert entry_loose["clipped"] == [] and "clipped" not in entry_plain
    assert all(torch.equal(a, b) for a, b in zip(_state(plain).values(), _state(loose).values(), strict=True))  # bit for bit

    norms = []
    probe = build_method(name, _setup(name, len(COUNTS)))
    for a in _replies(probe, 1, torch.Generator().manual_seed(0), COUNTS):
        norms.append(Contribution(0, 1.0, probe.contribution(a.update, 1)).norm())
    C = sorted(norms)[len(norms) // 2]  # the median: about half the clients are scaled down
    clipped, entry, replies = _round(name, [ClipEach(max_norm=C)])
    weights = [clipped.weigh(n) for n in COUNTS]
    contributions = [probe.contribution(a.update, 1) for a in replies]
    means = {}
    for key in contributions[0]:
        total = sum(w * min(1.0, C / norm) * c[key].double() for w, c, norm in zip(weights, contributions, norms))
        means[key] = total / sum(weights)
    reference = build_method(name, _setup(name, len(COUNTS)))
    reference.from_means(means, 1)
    got, want = _state(clipped), _state(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-12, atol=1e-14), key
    assert entry["clipped"] == sorted(k for k, n in enumerate(norms) if n > C) and entry["clipped"]
    if REGISTRY[name].exact and clipped.weighting.policy == "data":  # the run measures what clipping costs against the FedAvg ideal
        assert entry_plain["agg_noise"] < 1e-10 < 1e-3 < entry["agg_noise"]


@pytest.mark.parametrize("name", OTHERS)
def test_a_wrapper_with_a_method_that_needs_each_clients_own_reply_is_one_line(name):
    with pytest.raises(WrapperError) as err:
        _round(name, [ClipEach(max_norm=1.0)])
    line = str(err.value)
    assert "\n" not in line and line.startswith("federation.wrappers: ['clip']") and name in line and "fedit" in line


def test_a_wrapper_sees_sums_and_their_total_before_the_method_reads_their_ratio():
    """A user's wrapper (``package.module:Class``) that doubles every contribution and every sum's total leaves the mean alone:
    the method reads Σ w T / Σ w, whatever the wrapper did to both."""
    plain, _, _ = _round("fedit", [])
    (twice,) = build_wrappers([{"use": "tests.sim.test_seam:Twice"}])
    doubled, entry, _ = _round("fedit", [twice])
    assert entry["twice"] == 4 and twice.totals == [2 * sum(COUNTS)]
    assert all(torch.allclose(a, b, rtol=1e-14) for a, b in zip(_state(plain).values(), _state(doubled).values(), strict=True))


class Twice(Wrapper):
    """Doubles each contribution's tensors and the sums' total: the mean it hands on is unchanged."""

    name = "twice"

    def __init__(self) -> None:
        self.seen, self.totals = 0, []

    def contribution(self, c: Contribution, round: int) -> Contribution:
        self.seen += 1
        return Contribution(c.client, c.weight, {k: 2 * t for k, t in c.tensors.items()})

    def sums(self, sums, total, round):
        self.totals.append(2 * total)
        return sums, 2 * total

    def round_metrics(self):
        return {"twice": self.seen}


@pytest.mark.parametrize(("entry", "says"), [
    ({"max_norm": 1.0}, "entry {'max_norm': 1.0}"),
    ({"use": "clop"}, "unknown wrapper 'clop'"),
    ({"use": "clip", "max_norm": -1}, "clip max_norm -1 (accepted: a finite number > 0)"),
    ({"use": "clip", "max_norm": float("inf")}, "clip max_norm inf"),
    ({"use": "clip", "norm": 1.0}, "clip options {'norm': 1.0} do not fit it"),
    ({"use": "no.such.module:Thing"}, "'no.such.module:Thing' cannot be imported"),
    ({"use": "fedlora.config:Config"}, "not a wrapper class"),
])
def test_a_bad_wrapper_entry_is_one_line_that_names_it(entry, says):
    with pytest.raises(ConfigError) as err:
        build_wrappers([entry])
    assert says in str(err.value) and "\n" not in str(err.value) and str(err.value).startswith("federation.wrappers:")


def test_preflight_refuses_a_wrapper_on_flora_before_anything_loads():
    from fedlora.app.preflight import preflight

    cfg = load_config(packaged_config("tiny"), ["federation.wrappers=[{use: clip, max_norm: 0.5}]"])
    with pytest.raises(WrapperError, match="flora's aggregate needs each client's own factors"):
        preflight(cfg)
    preflight(load_config(packaged_config("tiny"), ["federation.method=fedit", "lora.rank=2", "federation.wrappers=[{use: clip, max_norm: 0.5}]"]))
