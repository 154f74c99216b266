"""The in-process federation: a short loop over the server and client halves of a round.

round 0 evaluation → per round: open (sample, plan) → each client's half in turn, its reply
folded in as it arrives → close (commit, heads, base, evaluation) → record → checkpoint. The
round's logic lives in ``fedlora.federation``; this module only orders it in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from fedlora.federation.client import client_round
from fedlora.federation.round import Arrival, start_of
from fedlora.federation.server import Server

Checkpoint = Callable[[dict[str, Any], int], None]
"""After a round's entry is recorded: (the entry, how many lines metrics.jsonl now holds)."""


@dataclass
class Hooks:
    """Progress callbacks, so the loop knows nothing of terminals."""

    round_start: Callable[[int, list[int]], None] = lambda r, clients: None
    client_start: Callable[[int, int], None] = lambda client, steps: None
    step: Callable[[float], None] = lambda loss: None
    round_end: Callable[[dict[str, Any]], None] = lambda record: None
    client_end: Callable[[int, int], None] = lambda round, client: None
    """After a client's reply is folded in (a test can stop the process here)."""


@dataclass
class Simulation:
    exp: Any  # federation.experiment.Experiment
    hooks: Hooks = field(default_factory=Hooks)

    def __post_init__(self) -> None:
        self.server = Server(self.exp)  # one frozen base for every client: the model's, at the current version

    @property
    def heads(self) -> dict:
        return self.server.heads.heads

    def evaluate(self) -> dict[str, Any]:
        return self.server.evaluate()

    def run(self, record: Callable[[dict[str, Any]], None], checkpoint: Checkpoint | None = None,
            done: list[dict[str, Any]] | None = None) -> None:
        """Round 0 (evaluation before training), then every round; ``done``: the entries of a resumed run.

        Only the count of recorded entries is kept (metrics.jsonl holds them), so memory stays flat in rounds.
        """
        lines = len(done or [])

        def finish(entry: dict[str, Any]) -> None:
            nonlocal lines
            record(entry)
            lines += 1
            self.hooks.round_end(entry)
            if checkpoint is not None:
                checkpoint(entry, lines)

        if not lines:
            finish(self.server.round_zero())
        start = done[-1]["round"] + 1 if done else 1
        for number in range(start, self.exp.cfg.federation.rounds + 1):
            finish(self.round(number))

    def round(self, number: int) -> dict[str, Any]:
        exp = self.exp
        rnd = self.server.open(number)
        self.hooks.round_start(number, rnd.sampled)
        for k in rnd.sampled:
            sent = rnd.plans.pop(k)  # what travels down
            self.hooks.client_start(k, exp.cfg.train.local_steps)
            plan, update, stats, kept = client_round(exp.method, exp.trainer, sent, self.server.train_data(k), self.server.kept.get(k), self.hooks.step)
            if kept is not None:
                self.server.kept[k] = kept  # the client's, never sent: in process it lives beside the server
            self.server.receive(rnd, Arrival(sent, plan, update, start_of(exp.method, plan), {"padded_fraction": stats.padded_fraction, "skipped_steps": stats.skipped_steps}))
            del sent, plan, update  # folded in: not kept
            self.hooks.client_end(number, k)
        return self.server.close(rnd)
