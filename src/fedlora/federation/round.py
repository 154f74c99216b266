"""The server's half of a round, written once for the simulator and for Flower.

Reply by reply: validate → record the row → fold into the method's running sum and the
agg_noise ideal; then commit → task heads → diagnostics → the round's metrics entry. An
update that fails validation is logged, recorded under ``rejected`` with its reason and left
out; if fewer than ``federation.min_clients`` remain the round fails before anything changes,
so the global state of the previous round stays intact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Method, as_received, plan_nbytes, update_nbytes
from fedlora.methods.validate import Bounds, check_update
from fedlora.federation import diagnostics
from fedlora.federation.seam import Seam, Wrapper
from fedlora.ops.weights import data_weights

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """Fewer than federation.min_clients usable updates in a round; the global state is unchanged."""


@dataclass
class Arrival:
    """One client's reply as the server sees it."""

    sent: ClientPlan  # the plan as sent (downlink bytes)
    plan: ClientPlan  # the plan as the client used it (after client_prepare)
    update: ClientUpdate
    start: Delta  # W_start,k − W_0: the base it trained on, after catching up
    extras: dict[str, Any] = field(default_factory=dict)  # the transport's additions to the client's row


def bounds_of(method: Method, max_norm: float, shrinks_rank: bool = False) -> Bounds:
    """What the server accepts from a client of this method (``shrinks_rank``: the local adapter prunes, e.g. AdaLoRA)."""
    min_rank = 0 if shrinks_rank else method.min_upload_rank
    return Bounds(method.setup.layers, max_norm, min_rank=min_rank, modules=method.modules)


def start_of(method: Method, plan: ClientPlan) -> Delta:
    """W_start,k − W_0 of a client that followed ``plan``: the current base plus the plan's fold."""
    out: Delta = {}
    for delta in (method.base_delta(), plan.fold):
        for name, terms in delta.items():
            out.setdefault(name, []).extend(terms)
    return out


class ServerRound:
    """The server's half of one round, fed one reply at a time, then finished.

    ``receive`` validates a reply, records its row and init_noise, and adds it to the round's
    seam (federation/seam.py: summed, folded or kept, as the method declares; through the
    wrappers) and to the agg_noise ideal. ``finish`` checks ``federation.min_clients``, commits
    the aggregate, the heads and the diagnostics, and returns the round's metrics entry. Nothing
    of the method's state changes before ``finish`` has enough usable replies.
    """

    def __init__(self, method: Method, bounds: Bounds, number: int, name: str, sampled: list[int], min_clients: int,
                 before: Delta, rejected: list[dict[str, Any]] | None = None, wrappers: list[Wrapper] | tuple[Wrapper, ...] = ()) -> None:
        self.method, self.bounds, self.number, self.name, self.sampled, self.min_clients = method, bounds, number, name, sampled, min_clients
        self.before = before
        self.rejected = list(rejected or [])  # may already hold replies the transport could not decode
        self.personal = method.personal  # no global model: the noises are undefined
        self.silent = not method.communicates
        self.seam = Seam(method, number, wrappers)
        self.ideal = None if self.personal else diagnostics.IdealSum()
        self.reference = diagnostics.Reference(before)  # ‖G_t − W_0‖_F, computed once a client needs it
        self.no_examples: list[tuple[Delta, ClientUpdate]] = []  # n_k = 0: weighed once every count is known (the ideal)
        self.heads: list[dict] = []  # the rows hold everything else a kept reply leaves
        self.rows: list[dict[str, Any]] = []
        self.lost: list[dict[str, Any]] = []  # clients the transport never heard back from (Flower)

    def receive(self, a: Arrival) -> None:
        reason = check_update(a.update, a.plan, self.bounds)
        if reason is not None:
            log.warning("round %d: update of client %d rejected: %s", self.number, a.plan.client, reason)
            self.rejected.append({"id": a.plan.client, "reason": reason})
            return
        u = as_received(a.update, a.plan, self.method.setup.layers)  # only the uploaded factors are the client's
        u = cast_update(u, self.method.setup.dtype)  # the state keeps its own dtype, whatever the upload's
        init = None if self.personal else diagnostics.init_noise(self.before, a.start, a.plan, self.reference)
        self.rows.append({
            "id": a.plan.client, "rank": a.plan.rank, "num_examples": u.num_examples, "train_loss": u.train_loss,
            "bytes_up": 0 if self.silent else update_nbytes(u, a.plan.upload), "bytes_down": 0 if self.silent else plan_nbytes(a.sent),
            "init_noise": init, "local_rank_sum": sum(f.rank for f in u.factors.values()),  # Σ over layers; pruning shrinks it
            **a.extras,
        })
        self.heads.append(u.head)
        self.seam.add(u, u.num_examples)
        if u.num_examples == 0:  # its weight is 0, or 1 if every count turns out to be 0 (data_weights)
            self.no_examples.append((a.start, u))
        else:
            self._ideal(a.start, u, float(u.num_examples))

    def _ideal(self, start: Delta, u: ClientUpdate, weight: float) -> None:
        if self.ideal is not None:
            self.ideal.add(start, u, weight)

    def finish(self, aggregate_heads: Callable[[list[int], list[dict], list[float]], None]) -> dict[str, Any]:
        need = min(self.min_clients, len(self.sampled))
        if len(self.rows) < need:
            raise RoundFailed(
                f"round {self.number}: {len(self.rows)} usable updates of {len(self.sampled)} sampled clients, federation.min_clients={need}; "
                f"rejected: {self.rejected}; lost: {self.lost}; the previous round's global state is kept"
            )
        counts = [r["num_examples"] for r in self.rows]
        if sum(counts) == 0:
            for start, u in self.no_examples:
                self._ideal(start, u, 1.0)
        applied = self.seam.finish()
        aggregate_heads([r["id"] for r in self.rows], self.heads, data_weights(counts))
        after = self.method.global_delta()
        return {
            "round": self.number,
            "method": self.name,
            "clients": self.rows,
            "weights": [applied[r["id"]] for r in self.rows] if applied else None,  # as the method applied them
            "agg_noise": None if self.ideal is None else self.ideal.agg_noise(self.before, after),
            "init_noise": None if self.personal else diagnostics.mean_defined(r["init_noise"] for r in self.rows),
            "bytes_up": sum(r["bytes_up"] for r in self.rows),
            "bytes_down": sum(r["bytes_down"] for r in self.rows),
            "local_rank_sum": sum(r["local_rank_sum"] for r in self.rows),
            "rejected": sorted(self.rejected, key=lambda x: x["id"]),
            **self.method.round_metrics(self.seam.replies),
            **self.seam.round_metrics(),
        }


def cast_update(u: ClientUpdate, dtype: torch.dtype) -> ClientUpdate:
    """The update with its factors in ``dtype`` (no copy where they already are)."""
    if all(f.B.dtype == dtype and f.A.dtype == dtype for f in u.factors.values()):
        return u
    return replace(u, factors={n: Factors(f.B.to(dtype), f.A.to(dtype)) for n, f in u.factors.items()})


def finish_round(
    method: Method, bounds: Bounds, number: int, name: str, sampled: list[int], min_clients: int, before: Delta,
    arrivals: list[Arrival], aggregate_heads: Callable[[list[int], list[dict], list[float]], None],
    rejected: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every reply of a round at once (Flower's ``aggregate_train``): receive each, then finish."""
    server = ServerRound(method, bounds, number, name, sampled, min_clients, before, rejected)
    for a in arrivals:
        server.receive(a)
    return server.finish(aggregate_heads)
