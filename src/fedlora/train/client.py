"""A client's side of a round: bring its frozen base up to date, fold, train, return factors.

Shared by the in-process simulator and the Flower ClientApp, so both run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlora.methods.base import ClientPlan, Delta


@dataclass
class ClientState:
    """What a client keeps between rounds: the merged deltas its frozen base holds (FLoRA)."""

    base: list[Delta] = field(default_factory=list)
    version: int = 0

    def catch_up(self, plan: ClientPlan) -> None:
        """Apply the plan's base updates this client does not hold yet, in order."""
        first = plan.base_version - len(plan.base_updates)
        skip = self.version - first
        if not 0 <= skip <= len(plan.base_updates):
            raise RuntimeError(f"client {plan.client}: base at version {self.version}, plan covers {first}..{plan.base_version}")
        self.base.extend(plan.base_updates[skip:])
        self.version = plan.base_version


def start_delta(state: ClientState, plan: ClientPlan) -> Delta:
    """W_start,k − W_0 per layer: the client's merged base plus this round's fold."""
    out: Delta = {}
    for delta in [*state.base, plan.fold]:
        for name, terms in delta.items():
            out.setdefault(name, []).extend(terms)
    return out
