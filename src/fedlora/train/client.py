"""A client's side of a round between rounds: its frozen base, and where it starts training.

Shared by the in-process simulator, the Flower ClientApp and the tests, so all run the same code.
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
