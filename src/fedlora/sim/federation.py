"""The in-process federation: the round loop, written once (style.md lesson 2).

sample → plan → train → fold each reply in → aggregate → diagnose → evaluate → record →
checkpoint. The method owns the math, the trainer the local work, ``server_round`` the server's
half of a round (shared with Flower), the run folder the files; this module only orders them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import psutil

from fedlora.methods.base import client_finish, client_prepare, client_regularizer
from fedlora.methods.validate import Bounds
from fedlora.ops.lowrank import weighted_mean
from fedlora.sim.checkpoint import kill_point
from fedlora.sim.experiment import Experiment
from fedlora.sim.server_round import Arrival, ServerRound, bounds_of, start_of


def sample_clients(num_clients: int, fraction: float, min_clients: int, seed: int, round: int) -> list[int]:
    """max(min_clients, round(fraction·N)) clients without replacement, seeded by (seed, round)."""
    m = min(num_clients, max(min_clients, int(round_half_up(fraction * num_clients))))
    rng = np.random.default_rng([seed, round])
    return sorted(int(k) for k in rng.choice(num_clients, size=m, replace=False))


def _fedavg(heads: list[dict], weights: list[float]) -> dict:
    return {n: weighted_mean([h[n] for h in heads], weights) for n in heads[0]}


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


@dataclass
class Hooks:
    """Progress callbacks, so the loop knows nothing of terminals."""

    round_start: Callable[[int, list[int]], None] = lambda r, clients: None
    client_start: Callable[[int, int], None] = lambda client, steps: None
    step: Callable[[float], None] = lambda loss: None
    round_end: Callable[[dict[str, Any]], None] = lambda record: None


@dataclass
class Simulation:
    exp: Experiment
    hooks: Hooks = field(default_factory=Hooks)

    def __post_init__(self) -> None:
        # one frozen base for every client: the model's, at the method's current version (methods.md §4)
        # a dense task head (classification) is FedAvg'd by the loop for every method; per client for a personal one
        head = self.exp.host.initial_head()
        self.heads = {c.id: head for c in self.exp.clients} if self._personal else {-1: head}

    @property
    def _personal(self) -> bool:
        return self.exp.method.personal

    def head_for(self, client: int) -> dict:
        return self.heads[client if self._personal else -1]

    def evaluate(self) -> dict[str, Any]:
        """Global model G_t on the global test split and on every client's test split.

        A personal method (``local``) has no global model: each client is evaluated with its own
        model, and the global split's loss is the mean of the clients' models on it.
        """
        exp = self.exp
        args = (exp.cfg.eval.batch_size, exp.tokenizer.pad_token_id, exp.device)
        score = lambda data: exp.trainer.task.evaluate(exp.host.model, data, *args)  # noqa: E731
        try:
            if self._personal:
                clients, on_global = {}, []
                for c in exp.clients:
                    exp.host.set_delta(exp.method.client_delta(c.id))
                    exp.host.set_head(self.head_for(c.id))
                    clients[str(c.id)] = score(c.test)
                    on_global.append(score(exp.global_test))
                return {"global": {k: sum(g[k] for g in on_global) / len(on_global) for k in on_global[0]}, "clients": clients}
            exp.host.set_delta(exp.method.adapter_delta())  # over the base, which already holds the merges
            exp.host.set_head(self.head_for(-1))
            return {"global": score(exp.global_test), "clients": {str(c.id): score(c.test) for c in exp.clients}}
        finally:
            exp.host.restore()

    def run(self, record: Callable[[dict[str, Any]], None], checkpoint: Callable[[int, list[dict[str, Any]]], None] | None = None,
            done: list[dict[str, Any]] | None = None) -> None:
        """Round 0 (evaluation before training), then every round; ``done``: the entries of a resumed run.

        ``checkpoint(round, metrics so far)`` runs after each round's entry is recorded.
        """
        cfg = self.exp.cfg
        metrics = list(done or [])

        def finish(entry: dict[str, Any]) -> None:
            metrics.append(entry)
            record(entry)
            self.hooks.round_end(entry)
            if checkpoint is not None:
                checkpoint(entry["round"], metrics)

        if not metrics:
            t0 = time.perf_counter()
            finish({"round": 0, "method": cfg.federation.method, "clients": [], "eval": self.evaluate(), "wall_s": time.perf_counter() - t0})
        for rnd in range(metrics[-1]["round"] + 1, cfg.federation.rounds + 1):
            t_round = time.perf_counter()
            entry = self.round(rnd)
            if rnd % cfg.eval.every == 0 or rnd == cfg.federation.rounds:
                entry["eval"] = self.evaluate()
            entry["wall_s"] = time.perf_counter() - t_round
            entry["rss_mb"] = psutil.Process().memory_info().rss / 2**20  # flat in rounds (methods.md §4)
            finish(entry)

    def _aggregate_heads(self, clients: list[int], heads: list[dict], weights: list[float]) -> None:
        if not heads or not heads[0]:
            return
        if self._personal:
            self.heads.update(zip(clients, heads))
        else:
            self.heads[-1] = _fedavg(heads, weights)

    def round(self, rnd: int) -> dict[str, Any]:
        exp, cfg = self.exp, self.exp.cfg
        fed = cfg.federation
        pooled = exp.method.pooled
        sampled = [0] if pooled else sample_clients(fed.num_clients, fed.fraction, fed.min_clients, cfg.seed, rnd)
        self.hooks.round_start(rnd, sampled)
        before = exp.method.global_delta()
        plans = {k: exp.method.plan(k, rnd) for k in sampled}
        server = ServerRound(exp.method, self.bounds, rnd, fed.method, sampled, fed.min_clients, before)
        for k in sampled:
            sent = plans[k]
            sent.head = self.head_for(k)
            plan = client_prepare(exp.method, sent)  # client side from here on
            self.hooks.client_start(k, cfg.train.local_steps)
            train = [e for c in exp.clients for e in c.train] if pooled else exp.clients[k].train
            update, stats = exp.trainer.fit(plan, train, on_step=self.hooks.step, regularizer=client_regularizer(exp.method, plan))
            update = client_finish(exp.method, plan, update)
            start = start_of(exp.method, plan)  # the base it trained on: the current one
            server.receive(Arrival(sent, plan, update, start, {"padded_fraction": stats.padded_fraction}))  # folded in: not kept
            del plans[k], sent, plan, update, start
            kill_point("mid-round", rnd)
        entry = server.finish(self._aggregate_heads)
        self.sync_base()
        return entry

    def sync_base(self) -> None:
        """Add the round's merge to the model's base, once, in place (merging methods only)."""
        merged = self.exp.method.merged
        if merged is not None:
            self.exp.host.catch_up(merged.update_since(self.exp.host.version))

    @property
    def bounds(self) -> Bounds:
        cfg = self.exp.cfg
        return bounds_of(self.exp.method, cfg.federation.max_update_norm, adalora=cfg.lora.adapter == "adalora")
