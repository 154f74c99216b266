"""The statistics of a study: means with 95 % confidence intervals over seeds, and paired comparisons.

Two methods run on the same seed share the partition, the sampled clients of every round and the
held-out examples, so their difference on that seed is free of all that variation: comparisons are
**paired** by seed. The test is the paired t-test (two-sided, n − 1 degrees of freedom) on the
per-seed differences, with Holm's correction over the comparisons of one table. Why not a
permutation test: the exact sign-flip test of n paired differences cannot give p below 2 / 2ⁿ, which
is 0.25 for the 3 seeds a study affords, so it could never find anything; its p is still reported
beside the t-test's, so a reader sees how much the conclusion leans on the t-test's assumption that
the differences are roughly normal.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


def finite(xs: Sequence[float | None]) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with the half-width of its 95 % t interval (None with fewer than two seeds)."""

    mean: float
    half: float | None
    n: int

    def text(self, digits: int = 4) -> str:
        """``mean ± half``; values too small for ``digits`` decimals (noise at round-off) in scientific notation."""
        tiny = 0 < abs(self.mean) < 10 ** -(digits - 1)
        fmt = (lambda x: f"{x:.2e}") if tiny else (lambda x: f"{x:.{digits}f}")  # noqa: E731
        return fmt(self.mean) + (f" ± {fmt(self.half)}" if self.half is not None else "")


def mean_ci(xs: Sequence[float | None], level: float = 0.95) -> Estimate | None:
    vals = finite(xs)
    if not vals:
        return None
    n = len(vals)
    mean = math.fsum(vals) / n
    if n < 2:
        return Estimate(mean, None, n)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    return Estimate(mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class Paired:
    """``a − b`` over the seeds both ran: mean with its 95 % interval, the paired t-test and the exact sign-flip p."""

    a: str
    b: str
    n: int
    diff: Estimate
    t: float | None
    p: float | None
    p_signflip: float | None
    p_holm: float | None = None


def paired(a: str, b: str, xa: dict[int, float | None], xb: dict[int, float | None]) -> Paired | None:
    """Compare by seed: only seeds where both have a finite value count."""
    seeds = sorted(s for s in set(xa) & set(xb) if finite([xa[s]]) and finite([xb[s]]))
    if not seeds:
        return None
    d = [float(xa[s]) - float(xb[s]) for s in seeds]  # type: ignore[arg-type]
    est = mean_ci(d)
    assert est is not None
    t = p = None
    if len(d) >= 2:
        sd = math.sqrt(math.fsum((x - est.mean) ** 2 for x in d) / (len(d) - 1))
        if sd > 0:
            t = est.mean / (sd / math.sqrt(len(d)))
            p = float(2 * stats.t.sf(abs(t), len(d) - 1))
        elif est.mean != 0:  # every seed the same non-zero difference
            t, p = math.copysign(math.inf, est.mean), 0.0
    return Paired(a, b, len(d), est, t, p, signflip_p(d))


def signflip_p(d: Sequence[float]) -> float | None:
    """Exact two-sided sign-flip permutation p of the mean difference (all 2ⁿ flips; n ≤ 16)."""
    if not d or len(d) > 16:
        return None
    observed = abs(math.fsum(d))
    flips = [abs(math.fsum(s * x for s, x in zip(signs, d))) for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(f >= observed - 1e-12 * max(observed, 1.0) for f in flips) / len(flips)


def holm(results: list[Paired]) -> list[Paired]:
    """Holm's step-down adjustment of the t-test p-values (family: the list given), order kept."""
    from dataclasses import replace

    ranked = sorted((r.p, i) for i, r in enumerate(results) if r.p is not None)
    m = len(ranked)
    adjusted: dict[int, float] = {}
    running = 0.0
    for j, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (m - j) * p))
        adjusted[i] = running
    return [replace(r, p_holm=adjusted.get(i)) for i, r in enumerate(results)]


def first_reaching(xs: Sequence[tuple[float, float | None]], target: float, lower_is_better: bool) -> float | None:
    """The first x whose value reaches ``target`` (≤ for a loss, ≥ for an accuracy); None if none does."""
    for x, v in xs:
        if v is not None and math.isfinite(v) and (v <= target if lower_is_better else v >= target):
            return x
    return None
