"""The study's statistics against hand computations (closed forms, no scipy on the checking side)."""

from __future__ import annotations

import math

import pytest

from fedlora.study.stats import first_reaching, holm, mean_ci, paired, signflip_p

T975 = {1: 12.706204736174707, 2: 4.302652729749464, 4: 2.7764451051977987}  # Student t 97.5 % quantiles (tables)


def test_mean_and_95_ci_over_seeds_match_the_t_interval_by_hand():
    xs = [2.31, 2.47, 2.40]
    mean = sum(xs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2)
    est = mean_ci(xs)
    assert est.n == 3 and est.mean == pytest.approx(mean, abs=1e-15)
    assert est.half == pytest.approx(T975[2] * sd / math.sqrt(3), rel=1e-12)
    assert mean_ci([1.0]).half is None and mean_ci([None, float("nan")]) is None
    assert mean_ci([3.0, None, 5.0]).mean == 4.0  # a cell without a value is left out, not counted as 0


def test_paired_t_with_two_seeds_is_the_cauchy_closed_form():
    """With 1 degree of freedom Student's t is the Cauchy distribution: p = 1 − 2·atan(|t|)/π."""
    a, b = {0: 2.50, 1: 2.61}, {0: 2.55, 1: 2.70}
    d = [-0.05, -0.09]
    mean, sd = sum(d) / 2, abs(d[0] - d[1]) / math.sqrt(2)
    t = mean / (sd / math.sqrt(2))
    res = paired("x", "y", a, b)
    assert res.n == 2 and res.diff.mean == pytest.approx(mean, abs=1e-15)
    assert res.t == pytest.approx(t, rel=1e-12)
    assert res.p == pytest.approx(1 - 2 * math.atan(abs(t)) / math.pi, rel=1e-10)
    assert res.diff.half == pytest.approx(T975[1] * sd / math.sqrt(2), rel=1e-12)


def test_paired_t_with_three_seeds_is_its_closed_form_and_pairs_by_seed():
    """With 2 degrees of freedom the two-sided p is 1 − |t|/√(2 + t²); seeds only one side ran are left out."""
    a = {0: 1.0, 1: 1.4, 2: 0.9, 7: 5.0}
    b = {0: 1.2, 1: 1.5, 2: 1.3, 9: 0.0}
    d = [-0.2, -0.1, -0.4]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    res = paired("a", "b", a, b)
    assert res.n == 3
    assert res.p == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-10)
    assert res.p_signflip == pytest.approx(2 / 8)  # all three the same sign: only the all-flip ties it


def test_sign_flip_p_counts_the_flips_by_hand():
    # d = (1, 2, -3): |sum| = 0, every one of the 8 flips is at least as extreme
    assert signflip_p([1.0, 2.0, -3.0]) == 1.0
    # d = (1, 2, 4): sums of ±1 ±2 ±4 with |s| >= 7: only (+,+,+) and (−,−,−)
    assert signflip_p([1.0, 2.0, 4.0]) == pytest.approx(2 / 8)
    # d = (1, 1, 1, 3): |s| >= 6: (+,+,+,+), (−,−,−,−) → 2/16
    assert signflip_p([1.0, 1.0, 1.0, 3.0]) == pytest.approx(2 / 16)


def test_holm_adjusts_step_down_and_keeps_order():
    ps = [0.01, 0.04, 0.03, None]
    results = []
    for p in ps:
        r = paired("a", "b", {0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.5})
        results.append(r.__class__(**{**r.__dict__, "p": p}))
    adjusted = [r.p_holm for r in holm(results)]
    # sorted 0.01, 0.03, 0.04 with m = 3: 0.03, max(0.03, 0.06) = 0.06, max(0.06, 0.04) = 0.06
    assert adjusted == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), None]


def test_time_to_target_is_the_first_crossing():
    curve = [(0, 3.0), (10, 2.7), (20, None), (30, 2.49), (40, 2.6)]
    assert first_reaching(curve, 2.5, lower_is_better=True) == 30
    assert first_reaching(curve, 2.0, lower_is_better=True) is None
    assert first_reaching([(0, 0.5), (5, 0.81)], 0.8, lower_is_better=False) == 5
