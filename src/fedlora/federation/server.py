"""The server half of every round, written once for the simulator and for Flower.

``open`` samples the round's clients and plans for each; ``receive`` takes one reply at a time
(validate → record → fold in, ``federation.round``); ``close`` commits the aggregate and the task
heads, brings the model's base to the new version, evaluates when due and returns the round's
metrics entry. ``state``/``load`` are what a checkpoint holds, for both transports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from fedlora.federation.heads import Heads
from fedlora.federation.round import Arrival, ServerRound, bounds_of
from fedlora.federation.seam import check_wrappers
from fedlora.federation.privacy import privacy_wrappers
from fedlora.federation.wrappers import build_wrappers
from fedlora.federation.client import client_evaluate, own_model
from fedlora.methods.base import ClientPlan, Delta, Kept
from fedlora.methods.state import load_state, state_of


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def sampled_count(num_clients: int, fraction: float, min_clients: int) -> int:
    """m = max(min_clients, round(fraction·N)), at most N: how many clients a round samples."""
    return min(num_clients, max(min_clients, round_half_up(fraction * num_clients)))


def sample_clients(num_clients: int, fraction: float, min_clients: int, seed: int, round: int) -> list[int]:
    """``sampled_count`` clients without replacement, seeded by (seed, round)."""
    m = sampled_count(num_clients, fraction, min_clients)
    rng = np.random.default_rng([seed, round])
    return sorted(int(k) for k in rng.choice(num_clients, size=m, replace=False))


@dataclass
class Round:
    """One open round: who was sampled, the plans still to send, the server's running half."""

    number: int
    sampled: list[int]
    plans: dict[int, ClientPlan]
    server: ServerRound
    t0: float = field(default_factory=time.perf_counter)


class Server:
    """Holds the method, the task heads and the model used for evaluation; runs the server half."""

    def __init__(self, exp: Any) -> None:
        self.exp = exp
        self.method = exp.method
        self.heads = Heads(exp.host.initial_head(), [c.id for c in exp.clients], exp.method.personal)
        cfg = exp.cfg
        self.bounds = bounds_of(self.method, cfg.federation.max_update_norm, shrinks_rank=exp.trainer.shrinks_rank)
        self.wrappers = build_wrappers(cfg.federation.wrappers) + privacy_wrappers(cfg)  # built once: a wrapper may keep state across rounds
        check_wrappers(self.method, self.wrappers)
        self.kept: dict[int, Kept] = {}
        """What each client keeps (``Method.keeps``) when the clients run in this process; over Flower it stays on the nodes."""

    # ---- a round ------------------------------------------------------------------------------

    def sample(self, number: int) -> list[int]:
        fed, seed = self.exp.cfg.federation, self.exp.cfg.seed
        return [0] if self.method.pooled else sample_clients(fed.num_clients, fed.fraction, fed.min_clients, seed, number)

    def open(self, number: int, rejected: list[dict[str, Any]] | None = None) -> Round:
        fed = self.exp.cfg.federation
        sampled = self.sample(number)
        before = self.method.global_delta()
        plans = {}
        for k in sampled:
            plans[k] = self.method.plan(k, number)
            plans[k].head = self.heads.of(k)
        return Round(number, sampled, plans, ServerRound(self.method, self.bounds, number, fed.method, sampled, fed.min_clients, before, rejected,
                                                      self.wrappers))

    def train_data(self, client: int) -> list[Any]:
        """What client k trains on in process (the pooled reference: everyone's data)."""
        clients = self.exp.clients
        return [e for c in clients for e in c.train] if self.method.pooled else clients[client].train

    def receive(self, rnd: Round, arrival: Arrival) -> None:
        rnd.server.receive(arrival)

    def evaluates(self, number: int) -> bool:
        """Whether round ``number`` ends with an evaluation: every ``eval.every`` rounds and at the last."""
        return number % self.exp.cfg.eval.every == 0 or number == self.exp.cfg.federation.rounds

    def close(self, rnd: Round, evaluate: bool = True) -> dict[str, Any]:
        """Commit the round; evaluate when due (``evaluate=False``: the clients evaluate, over Flower)."""
        entry = rnd.server.finish(self.heads.aggregate)
        self.sync_base()
        if evaluate and self.evaluates(rnd.number):
            entry["eval"] = self.evaluate(rnd.number)
        entry["wall_s"] = time.perf_counter() - rnd.t0
        entry["rss_mb"] = psutil.Process().memory_info().rss / 2**20  # flat in rounds (methods.md §4)
        return entry

    def round_zero(self) -> dict[str, Any]:
        """The evaluation before training: metrics.jsonl's first line."""
        t0 = time.perf_counter()
        entry = {"round": 0, "method": self.exp.cfg.federation.method, "clients": [], "eval": self.evaluate()}
        entry["wall_s"] = time.perf_counter() - t0
        return entry

    def base_dropped(self, client: int) -> None:
        """Client k dropped its saved base (damaged on its disk): its next plan brings it from W_0, a reset of every layer."""
        if self.method.merged is not None:
            self.method.merged.synced[client] = 0

    def sync_base(self) -> None:
        """Add the round's merge to the model's base, once, in place (merging methods only)."""
        merged = self.method.merged
        if merged is not None:
            self.exp.host.catch_up(merged.update_since(self.exp.host.version))

    # ---- evaluation ---------------------------------------------------------------------------

    def eval_plan(self, client: int, number: int) -> ClientPlan:
        """What a client evaluates its own model from after round ``number``: the plan of the next round."""
        plan = self.method.plan(client, number + 1)
        plan.head = self.heads.of(client)
        return plan

    def own_model(self, client: int) -> Delta:
        """Client k's own model over the base (personal methods), after the last round: what it would export."""
        if self.method.keeps:
            return own_model(self.method, self.eval_plan(client, self.exp.cfg.federation.rounds), self.kept.get(client))
        return self.method.client_delta(client)

    def evaluate(self, number: int = 0) -> dict[str, Any]:
        """Global model G_t on the global test split and on every client's test split.

        A personal method (``local``, FedSA-LoRA) has no global model: each client is evaluated
        with its own model, and the global split's loss is the mean of the clients' models on it.
        A method whose clients keep part of their model is evaluated as its clients do it
        (``client_evaluate``), from what they kept.
        """
        exp = self.exp
        args = (exp.cfg.eval.batch_size, exp.tokenizer.pad_token_id, exp.device)
        own = exp.cfg.eval.scores_clients(number, exp.cfg.federation.rounds)  # the clients' own splits too
        def score(data: list[Any]) -> dict[str, float]:
            with exp.trainer.autocast():
                return exp.trainer.task.evaluate(exp.host.model, data, *args)

        if self.method.keeps:
            splits = lambda c: {"test": c.test, "global": exp.global_test} if own else {"global": exp.global_test}  # noqa: E731
            return personal_eval({c.id: client_evaluate(self.method, exp.trainer, self.eval_plan(c.id, number), self.kept.get(c.id), splits(c), *args[:2])
                                  for c in exp.clients})
        try:
            if self.method.personal:
                scores = {}
                for c in exp.clients:
                    exp.host.set_delta(self.method.client_delta(c.id))
                    exp.host.set_head(self.heads.of(c.id))
                    scores[c.id] = {"test": score(c.test), "global": score(exp.global_test)} if own else {"global": score(exp.global_test)}
                return personal_eval(scores)
            exp.host.set_delta(self.method.adapter_delta())  # over the base, which already holds the merges
            exp.host.set_head(self.heads.of(-1))
            return {"global": score(exp.global_test), "clients": {str(c.id): score(c.test) for c in exp.clients} if own else {}}
        finally:
            exp.host.restore()

    # ---- checkpoints --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The live objects a checkpoint holds: the method's state, the task heads, what in-process clients keep."""
        return {"method": state_of(self.method), "heads": self.heads.state(), "kept": [[k, v] for k, v in sorted(self.kept.items())]}

    def load(self, state: dict[str, Any]) -> None:
        load_state(self.method, state["method"])
        self.heads.load(state["heads"])
        self.kept = {int(k): v for k, v in state.get("kept", [])}
        self.exp.host.reset_base()
        self.sync_base()  # the model's merged base, rebuilt from the method's state in the order it was built


def personal_eval(scores: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Each client's own model on its test split, and the mean of their scores on the global split.

    Summed in client order, not in the order the scores arrived: a float sum depends on its order, and the
    simulator and Flower (replies in any order) must write the same number."""
    on_global = [s["global"] for _, s in sorted(scores.items()) if "global" in s]
    mean = {k: sum(g[k] for g in on_global) / len(on_global) for k in on_global[0]} if on_global else {"loss": None}
    return {"global": mean, "clients": {str(k): s["test"] for k, s in sorted(scores.items()) if "test" in s}}
