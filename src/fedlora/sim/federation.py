"""The in-process federation: the round loop, written once (style.md lesson 2).

sample → plan → train → aggregate → diagnose → evaluate → record. The method owns the math,
the trainer the local work, the run folder the files; this module only orders them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fedlora.methods.base import ClientUpdate, client_finish, client_prepare, client_regularizer, plan_nbytes, update_nbytes
from fedlora.ops.weights import data_weights
from fedlora.sim import diagnostics
from fedlora.sim.experiment import Experiment
from fedlora.sim.similarity import module_similarity
from fedlora.train.client import ClientState, start_delta
from fedlora.ops.lowrank import weighted_mean


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
        self.states = {c.id: ClientState() for c in self.exp.clients}
        # a dense task head (classification) is FedAvg'd by the loop for every method; per client for a personal one
        head = self.exp.host.initial_head()
        self.heads = {c.id: head for c in self.exp.clients} if self._personal else {-1: head}

    @property
    def _personal(self) -> bool:
        return getattr(self.exp.method, "personal", False)

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
            exp.host.set_delta(exp.method.global_delta())
            exp.host.set_head(self.head_for(-1))
            return {"global": score(exp.global_test), "clients": {str(c.id): score(c.test) for c in exp.clients}}
        finally:
            exp.host.restore()

    def run(self, record: Callable[[dict[str, Any]], None]) -> None:
        cfg = self.exp.cfg
        t0 = time.perf_counter()
        first = {"round": 0, "method": cfg.federation.method, "clients": [], "eval": self.evaluate(), "wall_s": time.perf_counter() - t0}
        record(first)
        self.hooks.round_end(first)
        for rnd in range(1, cfg.federation.rounds + 1):
            t_round = time.perf_counter()
            entry = self.round(rnd)
            if rnd % cfg.eval.every == 0 or rnd == cfg.federation.rounds:
                entry["eval"] = self.evaluate()
            entry["wall_s"] = time.perf_counter() - t_round
            record(entry)
            self.hooks.round_end(entry)

    def _aggregate_heads(self, updates: list[ClientUpdate], weights: list[float]) -> None:
        if not updates or not updates[0].head:
            return
        if self._personal:
            self.heads.update({u.client: u.head for u in updates})
        else:
            self.heads[-1] = _fedavg([u.head for u in updates], weights)

    def round(self, rnd: int) -> dict[str, Any]:
        exp, cfg = self.exp, self.exp.cfg
        fed = cfg.federation
        pooled = getattr(exp.method, "pooled", False)
        sampled = [0] if pooled else sample_clients(fed.num_clients, fed.fraction, fed.min_clients, cfg.seed, rnd)
        self.hooks.round_start(rnd, sampled)
        before = exp.method.global_delta()
        plans = {k: exp.method.plan(k, rnd) for k in sampled}
        updates: list[ClientUpdate] = []
        starts, rows, inits = [], [], []
        for k in sampled:
            sent = plans[k]
            sent.head = self.head_for(k)
            plan = client_prepare(exp.method, sent)  # client side from here on
            self.hooks.client_start(k, cfg.train.local_steps)
            train = [e for c in exp.clients for e in c.train] if pooled else exp.clients[k].train
            update, stats = exp.trainer.fit(plan, self.states[k], train, on_step=self.hooks.step, regularizer=client_regularizer(exp.method, plan))
            update = client_finish(exp.method, plan, update)
            start = start_delta(self.states[k], plan)  # the base it trained on, after catching up
            inits.append(diagnostics.init_noise(before, start, plan))
            updates.append(update)
            starts.append(start)
            rows.append({
                "id": k, "rank": plan.rank, "num_examples": update.num_examples, "train_loss": update.train_loss,
                "bytes_up": update_nbytes(update, send_A=plan.train_A), "bytes_down": plan_nbytes(sent),
                "init_noise": inits[-1], "padded_fraction": stats.padded_fraction,
                "local_rank_sum": sum(f.rank for f in update.factors.values()),  # Σ over layers; AdaLoRA prunes it
            })
        weights = data_weights([u.num_examples for u in updates])
        exp.method.aggregate(updates, weights, rnd)
        self._aggregate_heads(updates, weights)
        after = exp.method.global_delta()
        if not getattr(exp.method, "communicates", True):
            for row in rows:
                row["bytes_up"] = row["bytes_down"] = 0
        personal = getattr(exp.method, "personal", False)  # no global model: the noises are undefined
        if personal:
            for row in rows:
                row["init_noise"] = None
        return {
            "round": rnd,
            "method": fed.method,
            "clients": rows,
            "weights": weights,
            "agg_noise": None if personal else diagnostics.agg_noise(before, after, starts, updates, weights),
            "init_noise": None if personal else diagnostics.mean_defined(inits),
            "bytes_up": sum(r["bytes_up"] for r in rows),
            "bytes_down": sum(r["bytes_down"] for r in rows),
            "local_rank_sum": sum(r["local_rank_sum"] for r in rows),
            **({"module_similarity": module_similarity(updates)} if fed.method == "fedplora" else {}),
        }
