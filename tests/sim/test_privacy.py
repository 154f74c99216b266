"""Client-level DP at the seam (federation/privacy.py): the accountant against dp-accounting driven here with the same
events, the noise against its stated scale, the clipping bound against the worst case, the budget's stop (float64)."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from fedlora.config import ConfigError, load_config, packaged_config
from fedlora.federation.privacy import ORDERS, ClientDP, calibrate, clients_per_round, epsilon
from fedlora.federation.seam import Contribution, WrapperError
from tests.sim.test_seam import _round

SUMS = ["fedit", "ffa", "rolora", "full"]


def _cfg(*extra):
    return load_config(packaged_config("tiny"), ["federation.method=fedit", "lora.rank=2", "privacy.mode=client", *extra])


def _independent(rounds, n, m, sigma, delta):
    """dp-accounting itself: one SampledWithoutReplacement(N, m, Gaussian σ) event composed per round, REPLACE_ONE, over
    the stated RDP orders; and with dp-accounting's default orders (up to 1024), which can only be tighter."""
    acc = rdp_privacy_accountant.RdpAccountant(orders=[*ORDERS], neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for _ in range(rounds):
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(sigma)))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(("n", "m", "sigma"), [(20, 2, 1.1), (50, 5, 0.8), (100, 10, 2.0)])
def test_epsilon_every_round_is_dp_accountings_for_the_same_events(n, m, sigma):
    for t in (1, 2, 10, 37):
        assert epsilon(t, n, m, sigma, 1e-5) == pytest.approx(_independent(t, n, m, sigma, 1e-5), rel=1e-9)
    if n != 20:
        return  # dp-accounting's default orders cost seconds an evaluation: one case
    default = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    default.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(sigma)), 37)
    assert default.get_epsilon(1e-5) <= epsilon(37, n, m, sigma, 1e-5) <= 1.01 * default.get_epsilon(1e-5)


def test_full_participation_is_the_gaussian_mechanism_and_the_rdp_bound_is_above_the_exact_epsilon():
    """m = N: T Gaussian releases of σ are one of σ/√T (μ = √T/σ); the exact ε(δ) of that Gaussian (Balle & Wang 2018)
    is a lower bound every valid accountant stays above, and RDP is within a small factor of it."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    sigma, T, delta = 2.0, 10, 1e-5
    mu = math.sqrt(T) / sigma

    def delta_of(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    exact = brentq(lambda e: delta_of(e) - delta, 1e-6, 100)
    ours = epsilon(T, 3, 3, sigma, delta)
    assert exact < ours < 1.3 * exact


def test_calibration_reaches_the_target_and_no_less_noise_would():
    sigma = calibrate(3.0, 100, 20, 2, 1e-5)
    assert epsilon(100, 20, 2, sigma, 1e-5) <= 3.0 < epsilon(100, 20, 2, sigma * 0.99, 1e-5)
    cfg = _cfg("privacy.target_epsilon=3", "federation.rounds=100", "federation.num_clients=20", "lora.rank=2", "federation.fraction=0.1")
    assert cfg.privacy.noise_multiplier == sigma and clients_per_round(cfg) == 2  # written into the config the run keeps


def test_max_epsilon_caps_the_rounds_at_the_last_release_within_it_and_a_reload_keeps_them(tmp_path):
    from fedlora.config import to_yaml

    cfg = _cfg("privacy.noise_multiplier=3.0", "federation.rounds=50", "privacy.max_epsilon=4")
    t = cfg.federation.rounds
    assert 1 < t < 50 and epsilon(t, 3, 3, 3.0, 1e-5) <= 4 < epsilon(t + 1, 3, 3, 3.0, 1e-5)
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg  # as a resumed run or a Flower node reads it: the same rounds and σ
    with pytest.raises(ConfigError, match=r"privacy.max_epsilon: 0.1 is passed by round 1 already"):
        _cfg("privacy.noise_multiplier=1.0", "privacy.max_epsilon=0.1")
    with pytest.raises(ConfigError, match="privacy.mode: 'client' needs privacy.noise_multiplier or privacy.target_epsilon"):
        _cfg()


def test_the_noise_has_the_stated_scale_and_is_drawn_the_same_for_the_same_round():
    """N(0, (2σC)²) on every coordinate (REPLACE_ONE: a sum of clipped contributions moves by 2C), the sum's total the
    planned m; the same draws for the same (seed, round), whichever process makes them."""
    sigma, clip = 0.7, 0.3
    dp = ClientDP(_cfg(f"privacy.noise_multiplier={sigma}", f"privacy.clip={clip}"))
    zero = {"x": torch.zeros(300, 300, dtype=torch.float64)}
    noisy, total = dp.sums(dict(zero), 5.0, 3)
    z = noisy["x"].flatten() / (2 * sigma * clip)
    assert total == 3 and abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert torch.equal(dp.sums(dict(zero), 5.0, 3)[0]["x"], noisy["x"]) and not torch.equal(dp.sums(dict(zero), 5.0, 4)[0]["x"], noisy["x"])


@pytest.mark.parametrize("name", SUMS)
def test_a_dp_round_is_the_uniform_clipped_sum_plus_that_noise_over_m(name):
    from fedlora.methods import build_method
    from tests.sim.test_seam import COUNTS, _replies, _setup, _state

    cfg = _cfg("privacy.noise_multiplier=0.7", "privacy.clip=0.3")
    dp, entry, replies = _round(name, [ClientDP(cfg)])
    probe = build_method(name, _setup(name, len(COUNTS)))
    contributions = [probe.contribution(a.update, 1) for a in _replies(probe, 1, torch.Generator().manual_seed(0), COUNTS)]
    sums = {}
    for c in contributions:
        factor = min(1.0, 0.3 / Contribution(0, 1.0, c).norm())
        for key, t in c.items():
            sums[key] = sums.get(key, 0) + factor * t  # weight 1 each, whatever the example counts
    noisy, m = ClientDP(cfg).sums(sums, float(len(contributions)), 1)
    reference = build_method(name, _setup(name, len(COUNTS)))
    reference.from_means({k: t / m for k, t in noisy.items()}, 1)
    got, want = _state(dp), _state(reference)
    assert all(torch.allclose(got[k], want[k], rtol=1e-12, atol=1e-14) for k in want)
    assert entry["privacy"] == {"epsilon": epsilon(1, 3, 3, 0.7, 1e-5), "delta": 1e-5, "noise_multiplier": 0.7, "clip": 0.3}


def test_one_client_with_a_huge_update_and_a_huge_weight_moves_the_sum_by_at_most_the_clip():
    wrapper = ClientDP(_cfg("privacy.noise_multiplier=0", "privacy.clip=0.5"))
    wrapper.begin(1)
    huge = Contribution(7, 1e9, {"l.B": torch.full((4, 3), 1e6, dtype=torch.float64), "l.A": torch.ones(3, 5, dtype=torch.float64)})
    c = wrapper.contribution(huge, 1)
    assert c.weight == 1.0 and c.norm() == pytest.approx(0.5, rel=1e-12) and wrapper.round_metrics()["clipped"] == [7]


@pytest.mark.parametrize("name", ["flora", "hetlora", "local", "fedplora"])
def test_a_method_that_needs_each_clients_own_update_refuses_privacy_in_one_line(name):
    with pytest.raises(WrapperError) as err:
        _round(name, [ClientDP(_cfg("privacy.noise_multiplier=1"))])
    line = str(err.value)
    assert line.startswith("privacy.mode: 'client' adds noise to sums, and ") and name in line and "fedit" in line and "\n" not in line
