"""agg_noise / init_noise agree with their definitions (methods.md §2) and with theory."""

import os

import pytest
import torch

from fedlora.methods import Setup, build_method
from fedlora.federation.diagnostics import agg_noise, init_noise
from fedlora.federation.server import sample_clients
from fedlora.train.client import ClientState, start_delta

from tests.dense_reference import dense, dense_agg_noise, run_round

LAYERS = {"a": (9, 7), "b": (5, 7)}


def _dense(delta, name):
    return dense(delta, name, LAYERS)


def _run_round(method, states, sampled, ranks, scales, gen, rnd):
    return run_round(method, states, sampled, ranks, scales, gen, rnd, LAYERS)


def _dense_agg_noise(before, after, starts, updates, w):
    return dense_agg_noise(before, after, starts, updates, w, LAYERS)


def test_flora_is_exact_under_partial_participation(gen):
    ranks, scales = {0: 3, 1: 2, 2: 1}, {0: 2.0, 1: 1.0, 2: 4.0}
    m = build_method("flora", Setup(LAYERS, ranks, scales, dtype=torch.float64))
    states = {k: ClientState() for k in ranks}
    for rnd, sampled in enumerate([(0, 1, 2), (0, 2), (1, 2)], start=1):
        before, after, starts, updates, w, inits = _run_round(m, states, sampled, ranks, scales, gen, rnd)
        assert agg_noise(before, after, starts, updates, w) < 1e-12
        assert all(x is not None and x < 1e-12 for x in inits)


WIDE = {"a": (60, 50), "b": (40, 50)}  # Σr of a round stays below min(d_out, d_in): the low-rank path


@pytest.mark.parametrize("layers", [LAYERS, WIDE], ids=["dense-path", "low-rank-path"])
def test_fedit_agg_noise_matches_the_dense_definition(gen, layers):
    ranks, scales = {k: 3 for k in range(3)}, {k: 2.0 for k in range(3)}
    m = build_method("fedit", Setup(layers, ranks, scales, dtype=torch.float64))
    states = {k: ClientState() for k in ranks}
    for rnd in (1, 2):
        before, after, starts, updates, w, inits = run_round(m, states, (0, 1, 2), ranks, scales, gen, rnd, layers)
        got = agg_noise(before, after, starts, updates, w)
        assert got > 1e-3
        assert abs(got - dense_agg_noise(before, after, starts, updates, w, layers)) < 1e-10 * got
        assert all(x is not None and x < 1e-12 for x in inits) or rnd == 1  # starts from the global factors


def test_init_noise_detects_a_client_that_does_not_start_from_the_global_model(gen):
    ranks, scales = {0: 2, 1: 2}, {0: 1.0, 1: 1.0}
    m = build_method("fedit", Setup(LAYERS, ranks, scales, dtype=torch.float64))
    states = {k: ClientState() for k in ranks}
    _run_round(m, states, (0, 1), ranks, scales, gen, 1)
    before = m.global_delta()
    plan = m.plan(0, 2)
    for f in plan.init.values():
        f.B.zero_()  # as if the client dropped the global factors
    assert abs(init_noise(before, start_delta(states[0], plan), plan) - 1.0) < 1e-12


def test_sampling_is_seeded_sized_and_without_replacement():
    a = sample_clients(10, 0.5, 1, seed=3, round=2)
    assert a == sample_clients(10, 0.5, 1, seed=3, round=2)
    assert len(a) == 5 and len(set(a)) == 5 and all(0 <= k < 10 for k in a)
    assert any(sample_clients(10, 0.5, 1, seed=3, round=r) != a for r in range(3, 8))
    assert len(sample_clients(10, 0.1, 4, seed=0, round=1)) == 4  # min_clients wins
    assert sample_clients(4, 1.0, 1, seed=0, round=1) == [0, 1, 2, 3]


def test_noise_does_not_depend_on_the_process_hash_seed():
    """A resumed run must reproduce the noise bit for bit, so no sum may follow set or hash order."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from fedlora.methods import Setup, build_method\n"
        "from fedlora.train.client import ClientState\n"
        "from tests.dense_reference import run_round\n"
        "layers = {f'block{i}.proj': (6 + i % 5, 7) for i in range(64)}  # many similar terms: their sum's order shows in its last bits\n"
        "g = torch.Generator().manual_seed(7)\n"
        "ranks, scales = {0: 3, 1: 2, 2: 2}, {0: 2.0, 1: 2.0, 2: 2.0}\n"
        "m = build_method('zeropad', Setup(layers, ranks, scales, dtype=torch.float64))\n"
        "states = {k: ClientState() for k in ranks}\n"
        "before, after, starts, updates, w, inits = run_round(m, states, (0, 1, 2), ranks, scales, g, 1, layers)\n"
        "from fedlora.federation.diagnostics import agg_noise\n"
        "print(repr(agg_noise(before, m.global_delta(), starts, updates, w)))\n"
    )
    out = [
        subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": str(seed)}, capture_output=True, text=True, check=True).stdout
        for seed in (1, 2, 3, 4)
    ]
    assert len(set(out)) == 1, out
