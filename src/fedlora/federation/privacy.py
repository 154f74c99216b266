"""Client-level differential privacy on a trusted server (``privacy.mode: client``), as a wrapper at the seam.

Each round is one release of the Gaussian mechanism on the sum of the sampled clients' contributions:

- every contribution weighs 1 (bounded weights: one client's share of the sum cannot exceed C) and is
  clipped to L2 norm C = ``privacy.clip`` over all its tensors;
- the sum gets N(0, (σ·Δ)²) on every coordinate, Δ the sum's L2 sensitivity. fedlora samples a fixed
  number m of the N clients without replacement, which dp-accounting accounts with the REPLACE_ONE
  relation (one client's data replaced by another's): Δ = 2C;
- the noisy sum is divided by m, the planned number of clients (public), not by how many replied;
- ε(δ) after round t is dp-accounting's RDP bound for t compositions of
  SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(σ)), written into every round's metrics.

σ is ``privacy.noise_multiplier``, or calibrated from ``privacy.target_epsilon`` over the configured rounds;
``privacy.max_epsilon`` caps the rounds at the last one whose ε stays within it. Both are settled when the
config loads (``planned``) and written into the run's config.yaml, so a resumed run and every Flower node
use the same σ and rounds. The noise is drawn from a generator seeded by (seed, round): the simulator and
Flower add the same noise, and a resumed run is bit-identical.

Evaluation on the clients' own test splits is a release this accountant does not count (docs/privacy.md).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import torch

from fedlora.config import Config, ConfigError
from fedlora.federation.seam import Contribution, Wrapper
from fedlora.federation.wrappers import ClipEach
from fedlora.ops.lowrank import seeded_generator

log = logging.getLogger(__name__)

NOISE_TAG = 0x0D1F  # the noise generator's stream, apart from every other seeded draw of a run
ORDERS = (1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)
"""The RDP orders ε is minimised over: dp-accounting's defaults reach 1024, and sampling without replacement costs
time linear in an integer order (seconds an evaluation); these give the same ε at the usual ε of 1–10 and a looser,
still valid, one below about 0.3."""


def clients_per_round(cfg: Config) -> int:
    """m: the number of clients the server samples each round (federation/server.py ``sample_clients``)."""
    from fedlora.federation.server import sampled_count  # server.py builds this module's wrapper

    f = cfg.federation
    return sampled_count(f.num_clients, f.fraction, f.min_clients)


@lru_cache(maxsize=256)
def epsilon(rounds: int, num_clients: int, per_round: int, sigma: float, delta: float) -> float:
    """ε(δ) after ``rounds`` releases: RDP accounting of sampling m of N without replacement, Gaussian σ (REPLACE_ONE)."""
    if rounds == 0:
        return 0.0
    if sigma == 0:
        return float("inf")
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(ORDERS), neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(_event(num_clients, per_round, sigma), rounds)
    return float(accountant.get_epsilon(delta))


def _event(num_clients: int, per_round: int, sigma: float) -> Any:
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(sigma)
    return gaussian if per_round == num_clients else dp_accounting.SampledWithoutReplacementDpEvent(num_clients, per_round, gaussian)


def calibrate(target: float, rounds: int, num_clients: int, per_round: int, delta: float) -> float:
    """The smallest σ (to 0.1 %) whose ε(δ) after ``rounds`` is at most ``target``."""
    low, high = 0.0, 1.0
    while epsilon(rounds, num_clients, per_round, high, delta) > target:
        low, high = high, 2 * high
        if high > 1e6:
            raise ConfigError(f"privacy.target_epsilon: {target} cannot be reached in {rounds} rounds (accepted: a larger target)")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if epsilon(rounds, num_clients, per_round, mid, delta) <= target else (mid, high)
    return high


def planned(cfg: Config) -> Config:
    """``cfg`` with σ calibrated (where only a target ε is given) and its rounds capped by ``privacy.max_epsilon``."""
    p, f = cfg.privacy, cfg.federation
    m = clients_per_round(cfg)
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = calibrate(p.target_epsilon, f.rounds, f.num_clients, m, p.delta)  # type: ignore[arg-type]
        log.info("privacy: σ = %.4f reaches ε = %g at δ = %g after %d rounds of %d of %d clients", sigma, p.target_epsilon, p.delta,
                 f.rounds, m, f.num_clients)
    rounds = f.rounds
    if p.max_epsilon is not None and epsilon(rounds, f.num_clients, m, sigma, p.delta) > p.max_epsilon:
        first = epsilon(1, f.num_clients, m, sigma, p.delta)
        if first > p.max_epsilon:
            raise ConfigError(f"privacy.max_epsilon: {p.max_epsilon} is passed by round 1 already (ε = {first:.3g} at δ = {p.delta:g}, σ = {sigma:.4g}) "
                              "(accepted: a larger privacy.max_epsilon or privacy.noise_multiplier, or fewer clients a round)")
        low, high = 1, rounds  # ε(low) within the budget, ε(high) past it
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if epsilon(mid, f.num_clients, m, sigma, p.delta) <= p.max_epsilon else (low, mid)
        log.warning("privacy: round %d would pass privacy.max_epsilon = %g (ε = %.3g at δ = %g): the run stops after round %d (ε = %.3g)",
                    high, p.max_epsilon, epsilon(high, f.num_clients, m, sigma, p.delta), p.delta, low,
                    epsilon(low, f.num_clients, m, sigma, p.delta))
        rounds = low
    if sigma == p.noise_multiplier and rounds == f.rounds:
        return cfg
    return cfg.model_copy(update={"privacy": p.model_copy(update={"noise_multiplier": sigma}),
                                  "federation": f.model_copy(update={"rounds": rounds})})


class ClientDP(ClipEach):
    """Uniform weights, clipping to C, Gaussian noise of std σ·2C on every summed coordinate, the sum over m."""

    name = "privacy"
    setting = "privacy.mode: 'client' adds noise to sums"

    def __init__(self, cfg: Config) -> None:
        p = cfg.privacy
        super().__init__(p.clip)
        self.sigma, self.delta, self.seed = float(p.noise_multiplier or 0.0), p.delta, cfg.seed
        self.num_clients, self.per_round = cfg.federation.num_clients, clients_per_round(cfg)
        self.std = self.sigma * 2 * self.max_norm  # REPLACE_ONE: the L2 sensitivity of a sum of clipped contributions is 2C
        self.round = 0

    def begin(self, round: int) -> None:
        super().begin(round)
        self.round = round

    def contribution(self, c: Contribution, round: int) -> Contribution:
        return super().contribution(Contribution(c.client, 1.0, c.tensors), round)

    def sums(self, sums: dict[str, torch.Tensor], total: float, round: int) -> tuple[dict[str, torch.Tensor], float]:
        gen = seeded_generator(self.seed, NOISE_TAG, round)
        noisy = {}
        for key in sorted(sums):  # a fixed order: the same draws for the same keys on every transport
            t = sums[key]
            noisy[key] = t + (self.std * torch.randn(t.shape, generator=gen, dtype=torch.float64)).to(t.dtype)
        return noisy, float(self.per_round)

    def round_metrics(self) -> dict[str, Any]:
        eps = epsilon(self.round, self.num_clients, self.per_round, self.sigma, self.delta)
        return {"clipped": sorted(self.clipped),
                "privacy": {"epsilon": eps, "delta": self.delta, "noise_multiplier": self.sigma, "clip": self.max_norm}}


def privacy_wrappers(cfg: Config) -> list[Wrapper]:
    """The wrappers ``privacy`` asks for (after the config's own ``federation.wrappers``)."""
    return [ClientDP(cfg)] if cfg.privacy.mode == "client" else []
