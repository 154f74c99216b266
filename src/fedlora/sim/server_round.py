"""The server's half of a round, written once for the simulator and for Flower.

Given the plans and the updates that arrived: validate → weights → method.aggregate → task
heads → diagnostics → the round's metrics entry. An update that fails validation is logged,
recorded under ``rejected`` with its reason and left out; if fewer than
``federation.min_clients`` remain the round fails before anything changes, so the global
state of the previous round stays intact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Method, plan_nbytes, update_nbytes
from fedlora.methods.validate import Bounds, check_update
from fedlora.ops.weights import data_weights
from fedlora.sim import diagnostics
from fedlora.sim.similarity import module_similarity

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


def bounds_of(method: Method, max_norm: float, adalora: bool = False) -> Bounds:
    """What the server accepts from a client of this method."""
    min_rank = 0 if adalora else (getattr(method, "r_min", 1) if getattr(method, "prunes", False) else None)
    return Bounds(method.setup.layers, max_norm, min_rank=min_rank, modules=getattr(method, "R", None))


def finish_round(
    method: Method, bounds: Bounds, number: int, name: str, sampled: list[int], min_clients: int, before: Delta,
    arrivals: list[Arrival], aggregate_heads: Callable[[list[ClientUpdate], list[float]], None],
    rejected: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Aggregate the valid updates into the method's state; the round's metrics entry.

    ``rejected`` may already hold replies the transport could not decode.
    """
    rejected = list(rejected or [])
    kept: list[Arrival] = []
    for a in arrivals:
        reason = check_update(a.update, a.plan, bounds)
        if reason is None:
            kept.append(a)
        else:
            log.warning("round %d: update of client %d rejected: %s", number, a.plan.client, reason)
            rejected.append({"id": a.plan.client, "reason": reason})
    need = min(min_clients, len(sampled))
    if len(kept) < need:
        raise RoundFailed(
            f"round {number}: {len(kept)} usable updates of {len(sampled)} sampled clients, federation.min_clients={need}; "
            f"rejected: {rejected}; the previous round's global state is kept"
        )
    updates = [a.update for a in kept]
    weights = data_weights([u.num_examples for u in updates])
    method.aggregate(updates, weights, number)
    aggregate_heads(updates, weights)
    after = method.global_delta()
    personal = getattr(method, "personal", False)  # no global model: the noises are undefined
    silent = not getattr(method, "communicates", True)
    rows, inits = [], []
    for a in kept:
        init = None if personal else diagnostics.init_noise(before, a.start, a.plan)
        inits.append(init)
        u = a.update
        rows.append({
            "id": a.plan.client, "rank": a.plan.rank, "num_examples": u.num_examples, "train_loss": u.train_loss,
            "bytes_up": 0 if silent else update_nbytes(u, send_A=a.plan.train_A), "bytes_down": 0 if silent else plan_nbytes(a.sent),
            "init_noise": init, "local_rank_sum": sum(f.rank for f in u.factors.values()),  # Σ over layers; AdaLoRA prunes it
            **a.extras,
        })
    return {
        "round": number,
        "method": name,
        "clients": rows,
        "weights": weights,
        "agg_noise": None if personal else diagnostics.agg_noise(before, after, [a.start for a in kept], updates, weights),
        "init_noise": None if personal else diagnostics.mean_defined(inits),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "local_rank_sum": sum(r["local_rank_sum"] for r in rows),
        "rejected": sorted(rejected, key=lambda x: x["id"]),
        **({"module_similarity": module_similarity(updates)} if name == "fedplora" else {}),
    }
