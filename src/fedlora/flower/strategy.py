"""The Flower Strategy: fedlora's server half (``federation.server``) with Flower messages for the client part.

``Strategy.start`` owns the loop; the hooks only convert between Flower records and fedlora types:

- ``configure_train``: ``Server.open`` (sample, plan) → one message per client's node (plan
  records + the resolved config);
- clients: ``federation.client.client_round`` on the SuperNode (ClientApp);
- ``aggregate_train``: decode the replies (in sampled order) → ``Server.receive`` each →
  ``Server.close`` (commit, heads, base, evaluation) → a checkpoint, as the simulator writes it;
- ``evaluate`` (Strategy.start's ``evaluate_fn``): the round's line in metrics.jsonl (``record``), then
  whatever the entry point keeps once a line is written (``keep``: the ServerApp's checkpoint).

A client whose node fails or does not answer within the round timeout is recorded under
``lost``, one whose reply fails to decode or validate under ``rejected``; the round goes on with
the others if at least ``federation.min_clients`` remain. ``start_round`` continues a run whose
checkpoint holds rounds 0..start_round (Flower counts its rounds from 1 again); ``lines`` counts the
metrics.jsonl entries it covers, and round 0 is evaluated only while there are none, as in
``Simulation.run`` (a checkpoint of round 0 alone has ``start_round`` 0 and one line).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedlora.federation.round import Arrival, RoundFailed, start_of
from fedlora.federation.server import Round, Server, personal_eval
from fedlora.flower.client_app import RUN
from fedlora.flower.state import NodeStateError
from fedlora.flower.records import WireError, message_nbytes, plan_to_records, records_to_update, update_stats
from fedlora.flower.roster import Roster

__all__ = ["FedLoraStrategy", "RoundFailed"]


@dataclass
class _Sent:
    """What configure_train leaves for aggregate_train beside the open round."""

    round: Round
    plans: dict[int, Any]
    messages: dict[int, Message] = field(default_factory=dict)
    wire_down: dict[int, int] = field(default_factory=dict)
    lost: list[dict[str, Any]] = field(default_factory=list)


class FedLoraStrategy(Strategy):
    """Flower records in, fedlora's server half, Flower records out."""

    def __init__(self, server: Server, roster: Roster, cfg_text: str, record: Callable[[dict[str, Any]], None],
                 roll_call_timeout: float = 60.0, keep: Callable[[dict[str, Any], int], None] | None = None, start_round: int = 0,
                 lines: int = 0, run_key: str = "run") -> None:
        self.server, self.roster, self.cfg_text, self.record, self.keep = server, roster, cfg_text, record, keep
        self.cfg = server.exp.cfg
        self.roll_call_timeout, self.run_key = roll_call_timeout, run_key
        if start_round < 0 or lines != start_round + 1 and (start_round, lines) != (0, 0):  # one line per round 0..start_round, or none yet
            raise ValueError(f"start_round={start_round} with lines={lines}: a run resumed after round t covers t + 1 lines, a new run 0")
        self.start_round, self.lines = start_round, lines  # lines: metrics.jsonl entries so far
        self.wire = self.cfg.federation.wire_dtype
        self.sent: _Sent | None = None
        self.entry: dict[str, Any] | None = None
        self.evaluating: dict[int, Message] = {}  # partition → evaluate message (Method.keeps)

    def summary(self) -> None:
        fed = self.cfg.federation
        log(INFO, "\t├── fedlora method %s (%s)", fed.method, self.server.method.summary)
        log(INFO, "\t├── %d partitions, fraction %.2f, min clients %d", fed.num_clients, fed.fraction, fed.min_clients)
        log(INFO, "\t└── ranks %s, wire dtype %s", self.cfg.client_ranks(), self.wire)

    # ---- train ------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        number = self.start_round + server_round
        self.roster.call(grid, self.roll_call_timeout)  # nodes that (re)connected since the last round
        rnd = self.server.open(number)
        sent = _Sent(rnd, dict(rnd.plans))
        for k in rnd.sampled:
            node = self.roster.node_of(k)
            if node is None:
                sent.lost.append({"id": k, "node": None, "error": "no connected SuperNode holds this partition"})
                continue
            content = plan_to_records(rnd.plans[k], self.wire)
            content[RUN] = ConfigRecord({"config": self.cfg_text, "run": self.run_key})
            sent.wire_down[k] = message_nbytes(content)
            sent.messages[k] = Message(content, dst_node_id=node.node_id, message_type=MessageType.TRAIN, group_id=str(number))
        rnd.plans.clear()  # encoded: the server keeps no plan beyond the message
        log(INFO, "round %d: partitions %s to nodes %s", number, rnd.sampled, {k: m.metadata.dst_node_id for k, m in sent.messages.items()})
        self.sent = sent
        return list(sent.messages.values())

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        sent = self.sent
        assert sent is not None and sent.round.number == self.start_round + server_round, "aggregate_train without configure_train"
        arrived = self._sort(sent, replies)
        method = self.server.method
        for k in [k for k in sent.round.sampled if k in arrived]:  # the simulator's client order
            plan = method.client_prepare(sent.plans[k])  # the client's pure expansion, repeated here
            content = arrived[k].content
            try:
                update = records_to_update(content, plan, method.setup.layers)
                stats = update_stats(content)
                node_rank = int(content.config_records["update"].get("node_rank", plan.rank))
            except (WireError, KeyError, TypeError, ValueError, AssertionError) as e:  # malformed records, mismatched factor shapes
                sent.round.server.rejected.append({"id": k, "reason": f"undecodable reply: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"})
                continue
            extras = {
                "padded_fraction": float(stats.get("padded-fraction", 0.0)), "skipped_steps": int(stats.get("skipped-steps", 0)),
                "wire_bytes_up": message_nbytes(content),
                "wire_bytes_down": sent.wire_down[k], "node": arrived[k].metadata.src_node_id, "node_rank": node_rank,
                "timing": {key.removesuffix("-s").replace("-", "_") + "_s": v for key, v in stats.items() if key.endswith("-s")},
            }
            self.server.receive(sent.round, Arrival(sent.plans[k], plan, update, start_of(method, plan), extras))  # it replied: it caught up
        sent.round.server.lost = sent.lost
        entry = self.server.close(sent.round, evaluate=not method.keeps)  # keeps: the clients evaluate (configure_evaluate)
        entry.update({
            "wire_bytes_up": sum(r["wire_bytes_up"] for r in entry["clients"]),
            "wire_bytes_down": sum(sent.wire_down.values()),  # every plan sent, also to clients lost later
            "wire_dtype": self.wire,
            "lost": sorted(sent.lost, key=lambda x: x["id"]),
        })
        self.entry, self.sent = entry, None
        metrics = MetricRecord({"clients": len(entry["clients"]), "lost": len(sent.lost), "rejected": len(entry["rejected"]),
                                "bytes-up": entry["bytes_up"], "wire-bytes-up": entry["wire_bytes_up"]})
        return None, metrics

    def _sort(self, sent: _Sent, replies: Iterable[Message]) -> dict[int, Message]:
        """The usable replies by partition; errors and silences go to ``lost``."""
        number = sent.round.number
        by_id = {m.metadata.message_id: k for k, m in sent.messages.items()}
        arrived: dict[int, Message] = {}
        for reply in replies:
            k = by_id.get(reply.metadata.reply_to_message_id)
            if k is None:
                log(WARNING, "round %d: a reply to no message of this round, dropped", number)
            elif reply.has_error():
                sent.lost.append({"id": k, "node": sent.messages[k].metadata.dst_node_id, "error": f"{reply.error.code}: {reply.error.reason}"[:500]})
                if NodeStateError.MARKER in reply.error.reason:  # it dropped a damaged base: its next plan starts it from W_0
                    self.server.base_dropped(k)
            else:
                arrived[k] = reply
        for k, m in sent.messages.items():
            if k not in arrived and not any(x["id"] == k for x in sent.lost):
                sent.lost.append({"id": k, "node": m.metadata.dst_node_id, "error": "no reply within round-timeout"})
        for lost in sent.lost:
            log(WARNING, "round %d: lost partition %d (node %s): %s", number, lost["id"], lost["node"], lost["error"].splitlines()[0])
        return arrived

    # ---- evaluation: on the server inside Server.close, or by the clients that keep part of their model ----

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """None, unless the method's clients keep part of their model (FedSA-LoRA): then every partition evaluates its own."""
        number = self.start_round + server_round
        if not self.server.method.keeps or not self.server.evaluates(number):
            return []  # the global model is evaluated on the server (Server.close), exactly as the simulator does
        self.roster.call(grid, self.roll_call_timeout)
        self.evaluating = {}
        for k in range(self.cfg.federation.num_clients):
            node = self.roster.node_of(k)
            if node is None:
                continue
            content = plan_to_records(self.server.eval_plan(k, number), self.wire)
            content[RUN] = ConfigRecord({"config": self.cfg_text, "run": self.run_key})
            self.evaluating[k] = Message(content, dst_node_id=node.node_id, message_type=MessageType.EVALUATE, group_id=str(number))
        return list(self.evaluating.values())

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The clients' scores as the round's ``eval`` (``personal_eval``, as the simulator computes it)."""
        if not self.evaluating:
            return None
        by_id = {m.metadata.message_id: k for k, m in self.evaluating.items()}
        scores: dict[int, dict[str, dict[str, float]]] = {}
        for reply in replies:
            k = by_id.get(reply.metadata.reply_to_message_id)
            if k is None or reply.has_error():
                log(WARNING, "evaluation reply of partition %s lost: %s", k, reply.error.reason if reply.has_error() else "unknown message")
                continue
            for key, value in reply.content.metric_records["eval"].items():
                split, _, metric = key.partition("/")
                scores.setdefault(k, {}).setdefault(split, {})[metric] = float(value)
        self.evaluating = {}
        assert self.entry is not None
        self.entry["eval"] = personal_eval(scores)
        if missing := sorted(set(range(self.cfg.federation.num_clients)) - set(scores)):
            self.entry["eval"]["missing"] = missing
        return None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Strategy.start's evaluate_fn: write the round's line (round 0: evaluate first), then what the entry point keeps."""
        if server_round == 0:
            if self.lines:
                return None  # a resumed run, also one from round 0's checkpoint: its round 0 is in metrics.jsonl already
            entry = self.server.round_zero()
        else:
            assert self.entry is not None
            entry, self.entry = self.entry, None
        self.record(entry)
        self.lines += 1
        if self.keep is not None:
            self.keep(entry, self.lines)
        if "eval" not in entry or entry["eval"]["global"]["loss"] is None:
            return None
        return MetricRecord({"global-loss": float(entry["eval"]["global"]["loss"])})

