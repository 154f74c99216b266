"""A client's frozen base as pure terms, and where it starts training.

The model side holds the same base densely (``AdapterHost``); this is its exact, model-free form,
with which the tests follow a client from its plans alone, as a Flower node does.
"""

from __future__ import annotations

from fedlora.methods.base import ClientPlan, Delta
from fedlora.methods.merged_base import BaseDelta as ClientState  # W_v − W_0 at version v, bounded in rounds

__all__ = ["ClientState", "start_delta"]


def start_delta(state: ClientState, plan: ClientPlan) -> Delta:
    """W_start,k − W_0 per layer: the client's merged base plus this round's fold."""
    out: Delta = {}
    for delta in [state.delta(), plan.fold]:
        for name, terms in delta.items():
            out.setdefault(name, []).extend(terms)
    return out
