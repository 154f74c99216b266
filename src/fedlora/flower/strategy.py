"""The Flower Strategy: fedlora's round, step for step, with messages for the client part.

``Strategy.start`` owns the loop; the hooks do what ``Simulation.round`` does, in its order:

- ``configure_train``: sample (the simulator's seeded rule, over partitions) → ``method.plan``
  per client → one message per client's node (plan records + the resolved config);
- clients: client_prepare, catch_up + train (client_regularizer), client_finish (ClientApp);
- ``aggregate_train``: decode the updates (in sampled order), then the simulator's own server
  half of a round (``sim/server_round.finish_round``: validate and fold in each reply, then
  commit → heads → diagnostics); every client trained on the current base, which the plan
  brought it to;
- ``evaluate`` (Strategy.start's ``evaluate_fn``): the simulator's evaluation, then the round's
  line in metrics.jsonl.

A client whose node fails or does not answer within the round timeout is recorded under
``lost``, one whose reply fails to decode or validate under ``rejected``; the round goes on with
the others if at least ``federation.min_clients`` remain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import psutil
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedlora.flower.client_app import RUN
from fedlora.flower.records import WireError, message_nbytes, plan_to_records, records_to_update, update_stats
from fedlora.flower.roster import Roster
from fedlora.methods.base import ClientPlan, Delta, client_prepare
from fedlora.ops.lowrank import Dense
from fedlora.sim.experiment import Experiment
from fedlora.sim.federation import Simulation, sample_clients
from fedlora.sim.server_round import Arrival, RoundFailed, finish_round, start_of

__all__ = ["FedLoraStrategy", "RoundFailed"]


@dataclass
class _Round:
    """What configure_train leaves for aggregate_train."""

    number: int
    sampled: list[int]
    before: Delta
    plans: dict[int, ClientPlan]
    sent: dict[str, int] = field(default_factory=dict)  # message id → partition (ids exist once pushed)
    messages: dict[int, Message] = field(default_factory=dict)
    wire_down: dict[int, int] = field(default_factory=dict)
    lost: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)


class FedLoraStrategy(Strategy):
    """Delegates the math to a fedlora method and the evaluation to the simulator's code."""

    def __init__(self, exp: Experiment, roster: Roster, cfg_text: str, record: Callable[[dict[str, Any]], None],
                 roll_call_timeout: float = 60.0, checkpoints: Path | None = None) -> None:
        self.exp, self.roster, self.cfg_text, self.record = exp, roster, cfg_text, record
        self.sim = Simulation(exp)  # evaluate(), on the server's model at the method's current base
        self.roll_call_timeout, self.checkpoints = roll_call_timeout, checkpoints
        self.wire = exp.cfg.federation.wire_dtype
        self.round: _Round | None = None
        self.entry: dict[str, Any] | None = None

    def summary(self) -> None:
        fed = self.exp.cfg.federation
        log(INFO, "\t├── fedlora method %s (%s)", fed.method, self.exp.method.summary)
        log(INFO, "\t├── %d partitions, fraction %.2f, min clients %d", fed.num_clients, fed.fraction, fed.min_clients)
        log(INFO, "\t└── ranks %s, wire dtype %s", self.exp.cfg.client_ranks(), self.wire)

    # ---- train ------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        exp, fed = self.exp, self.exp.cfg.federation
        self.roster.call(grid, self.roll_call_timeout)  # nodes that (re)connected since the last round
        pooled = exp.method.pooled
        sampled = [0] if pooled else sample_clients(fed.num_clients, fed.fraction, fed.min_clients, exp.cfg.seed, server_round)
        rnd = _Round(server_round, sampled, exp.method.global_delta(), {k: exp.method.plan(k, server_round) for k in sampled})
        for k in sampled:
            rnd.plans[k].head = self.sim.head_for(k)  # the dense task head (classification), as the simulator sends it
            node = self.roster.node_of(k)
            if node is None:
                rnd.lost.append({"id": k, "node": None, "error": "no connected SuperNode holds this partition"})
                continue
            content = plan_to_records(rnd.plans[k], self.wire)
            content[RUN] = ConfigRecord({"config": self.cfg_text})
            rnd.wire_down[k] = message_nbytes(content)
            rnd.messages[k] = Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN, group_id=str(server_round))
        log(INFO, "round %d: partitions %s to nodes %s", server_round, sampled, {k: m.metadata.dst_node_id for k, m in rnd.messages.items()})
        self.round = rnd
        return list(rnd.messages.values())

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        exp, rnd = self.exp, self.round
        assert rnd is not None and rnd.number == server_round, "aggregate_train without configure_train"
        by_id = {m.metadata.message_id: k for k, m in rnd.messages.items()}
        arrived: dict[int, Message] = {}
        for reply in replies:
            k = by_id.get(reply.metadata.reply_to_message_id)
            if k is None:
                log(WARNING, "round %d: a reply to no message of this round, dropped", server_round)
            elif reply.has_error():
                rnd.lost.append({"id": k, "node": rnd.messages[k].metadata.dst_node_id, "error": f"{reply.error.code}: {reply.error.reason}"[:500]})
            else:
                arrived[k] = reply
        for k, m in rnd.messages.items():
            if k not in arrived and not any(x["id"] == k for x in rnd.lost):
                rnd.lost.append({"id": k, "node": m.metadata.dst_node_id, "error": "no reply within round-timeout"})
        order = [k for k in rnd.sampled if k in arrived]  # the simulator's client order
        need = min(exp.cfg.federation.min_clients, len(rnd.sampled))
        if len(order) < need:
            raise RoundFailed(f"round {server_round}: {len(order)} of {len(rnd.sampled)} clients replied, federation.min_clients={need}; lost: {rnd.lost}")
        for lost in rnd.lost:
            log(WARNING, "round %d: lost partition %d (node %s): %s", server_round, lost["id"], lost["node"], lost["error"].splitlines()[0])

        arrivals, undecodable = [], []
        for k in order:
            sent = rnd.plans[k]
            plan = client_prepare(exp.method, sent)  # the client's pure expansion, repeated here
            content = arrived[k].content
            try:
                update = records_to_update(content, frozen_A={n: f.A for n, f in (plan.init or {}).items()})
                stats = update_stats(content)
                node_rank = int(content.config_records["update"].get("node_rank", plan.rank))
            except (WireError, KeyError, TypeError, ValueError, AssertionError) as e:  # malformed records, mismatched factor shapes
                undecodable.append({"id": k, "reason": f"undecodable reply: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"})
                continue
            extras = {
                "padded_fraction": float(stats.get("padded-fraction", 0.0)), "wire_bytes_up": message_nbytes(content),
                "wire_bytes_down": rnd.wire_down[k], "node": arrived[k].metadata.src_node_id, "node_rank": node_rank,
                "timing": {key.removesuffix("-s").replace("-", "_") + "_s": v for key, v in stats.items() if key.endswith("-s")},
            }
            arrivals.append(Arrival(sent, plan, update, start_of(exp.method, plan), extras))  # it replied, so it caught up
        fed = exp.cfg.federation
        entry = finish_round(exp.method, self.sim.bounds, server_round, fed.method, rnd.sampled, fed.min_clients, rnd.before, arrivals,
                             self.sim._aggregate_heads, rejected=undecodable)
        self.sim.sync_base()
        entry.update({
            "wire_bytes_up": sum(r["wire_bytes_up"] for r in entry["clients"]),
            "wire_bytes_down": sum(rnd.wire_down.values()),  # every plan sent, also to clients lost later
            "wire_dtype": self.wire,
            "lost": sorted(rnd.lost, key=lambda x: x["id"]),
        })
        self.entry = entry
        if self.checkpoints is not None:
            save_delta(exp.method.global_delta(), self.checkpoints / f"round-{server_round}-delta.safetensors")
        metrics = MetricRecord({"clients": len(entry["clients"]), "lost": len(rnd.lost), "rejected": len(entry["rejected"]),
                                "bytes-up": entry["bytes_up"], "wire-bytes-up": entry["wire_bytes_up"]})
        return None, metrics

    # ---- evaluation: on the server, as in the simulator ------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the global model is evaluated by `evaluate` on the server, exactly as the simulator does

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Strategy.start's evaluate_fn: evaluate when the simulator would, then write the round's line."""
        cfg = self.exp.cfg
        if server_round == 0:
            t0 = time.perf_counter()
            entry = {"round": 0, "method": cfg.federation.method, "clients": [], "eval": self.sim.evaluate()}
            entry["wall_s"] = time.perf_counter() - t0
        else:
            assert self.entry is not None and self.round is not None
            entry, self.entry = self.entry, None
            if server_round % cfg.eval.every == 0 or server_round == cfg.federation.rounds:
                entry["eval"] = self.sim.evaluate()
            entry["wall_s"] = time.perf_counter() - self.round.t0
            entry["rss_mb"] = psutil.Process().memory_info().rss / 2**20
        self.record(entry)
        if "eval" not in entry or entry["eval"]["global"]["loss"] is None:
            return None
        return MetricRecord({"global-loss": float(entry["eval"]["global"]["loss"])})


def save_delta(delta: Delta, path: Path) -> None:
    """G_t − W_0 as its terms: ``<layer>/<j>/B|A`` (or ``/W`` for a dense one) in one safetensors file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, terms in delta.items():
        for j, t in enumerate(terms):
            for key, x in zip("W" if isinstance(t, Dense) else "BA", t.tensors()):
                tensors[f"{layer}/{j}/{key}"] = x.detach().contiguous().clone()
    save_file(tensors, str(path))
