"""The one seam between a round's replies and the method's next state: begin → add → finish, for every method.

What a method declares decides what happens in between (architecture.md §2c):

- a ``sums_only`` method (methods/sums.py) declares each client's contribution, named tensors T_k. The
  seam weighs them, passes each through the wrappers, sums Σ_k w_k T_k, passes the sums through the
  wrappers again and hands their means to ``from_means``. This is where a wrapper clips a
  contribution, adds noise to the sums or has them summed securely;
- a method that folds replies itself (FLoRA's stack, zero-padding) gets each reply as it arrives;
- any other method (HETLoRA, FlexLoRA, Fed-PLoRA, FedEx, ``local``) gets the round's replies at once.

Wrappers see contributions and sums only, never a method's layout; one configured with a method that
needs each client's own reply is refused before the run starts (``check_wrappers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedlora.config import ConfigError
from fedlora.methods.base import ClientUpdate, Method
from fedlora.methods.folding import add_weighted


class WrapperError(ConfigError):
    """A ``federation.wrappers`` entry that cannot be built or cannot act on this method; one line."""


@dataclass
class Contribution:
    """What one client adds to a ``sums_only`` method's round: weight w_k and named tensors T_k."""

    client: int
    weight: float
    tensors: dict[str, torch.Tensor]

    def norm(self) -> float:
        """‖T_k‖_2 over all its tensors together (float64)."""
        return float(sum(float(t.to(torch.float64).pow(2).sum()) for t in self.tensors.values())) ** 0.5


class Wrapper:
    """Acts at the seam of a ``sums_only`` method, like Flower's DP wrappers around a strategy.

    ``begin`` opens a round; ``contribution`` sees each client's contribution before it is summed (clip, re-weigh); ``sums``
    sees Σ_k w_k T_k and Σ_k w_k before the method reads their ratio (noise). ``round_metrics`` goes
    into the round's metrics entry. The defaults change nothing.
    """

    name = "wrapper"
    setting = ""  # what the refusal names where the config did not list the wrapper itself (privacy.mode)

    def begin(self, round: int) -> None:
        """A round starts (a round that failed may have left per-round bookkeeping behind)."""

    def contribution(self, c: Contribution, round: int) -> Contribution:
        return c

    def sums(self, sums: dict[str, torch.Tensor], total: float, round: int) -> tuple[dict[str, torch.Tensor], float]:
        return sums, total

    def round_metrics(self) -> dict[str, Any]:
        return {}


class Seam:
    """One round's aggregation: ``add`` every usable reply with its example count, then ``finish``.

    A reply with no examples weighs 0, or 1 if every reply of the round has none (ops/weights.py): its
    weight is known only once the round's replies are in, so it is added at ``finish``.
    """

    def __init__(self, method: Method, round: int, wrappers: list[Wrapper] | tuple[Wrapper, ...] = ()) -> None:
        check_wrappers(method, wrappers)
        self.method, self.round, self.wrappers = method, round, list(wrappers)
        for w in self.wrappers:
            w.begin(round)
        self.acc = method.begin(round) if method.folds else None  # type: ignore[attr-defined]
        self.replies: list[ClientUpdate] = []  # methods that take the round's replies at once (``aggregate``)
        self.counts: list[int] = []
        self.empty: list[ClientUpdate] = []

    def add(self, u: ClientUpdate, count: int) -> None:
        self.counts.append(count)
        if self.acc is None:  # only a method that takes the round at once holds every reply
            self.replies.append(u)
            return
        if count == 0:
            self.empty.append(u)
        else:
            self._fold(u, float(count))

    def _fold(self, u: ClientUpdate, weight: float) -> None:
        assert self.acc is not None, "only a folding method folds"
        if not self.method.sums_only:
            self.method.fold(self.acc, u, weight)  # type: ignore[attr-defined]
            return
        c = Contribution(u.client, self.method.weigh(weight), self.method.contribution(u, self.round))  # type: ignore[attr-defined]
        for w in self.wrappers:
            c = w.contribution(c, self.round)
        self.acc.add(c.client, c.weight)
        for key, t in c.tensors.items():
            add_weighted(self.acc.layers, key, t, c.weight, self.method.setup.dtype)

    def finish(self) -> dict[int, float]:
        """Commit the aggregate; each reply's weight as the method applied it, normalised (empty: none applied)."""
        if self.acc is None:
            applied = self.method.aggregate(self.replies, [float(n) for n in self.counts], self.round) or []  # counts: the method weighs them
            return dict(zip((u.client for u in self.replies), applied))
        every_count_zero = sum(self.counts) == 0
        for u in self.empty:
            self._fold(u, 1.0 if every_count_zero else 0.0)  # a uniform-weight method still counts it
        if not self.method.sums_only:
            self.method.commit(self.acc)  # type: ignore[attr-defined]
            return self.acc.applied()
        sums, total = self.acc.layers, self.acc.total
        for w in self.wrappers:
            sums, total = w.sums(sums, total, self.round)
        assert total > 0, "a round's weights sum to zero"
        self.method.from_means({key: t.mul_(1.0 / total) for key, t in sums.items()}, self.round)  # type: ignore[attr-defined]
        return self.acc.applied()

    def round_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for w in self.wrappers:
            out.update(w.round_metrics())
        return out


def check_wrappers(method: Method, wrappers: list[Wrapper] | tuple[Wrapper, ...]) -> None:
    """A wrapper acts on contributions and sums: a method that needs each client's own reply cannot have one."""
    if wrappers and not method.sums_only:
        from fedlora.methods.registry import available

        sums = ", ".join(sorted(n for n, cls in available().items() if cls.sums_only))
        why = f"{method.name}'s aggregate needs each client's own factors"
        if own := next((w.setting for w in wrappers if w.setting), None):
            raise WrapperError(f"{own}, and {why} (accepted: a sums_only method: {sums})")
        raise WrapperError(f"federation.wrappers: {[w.name for w in wrappers]} act on sums, and {why} (accepted: no wrappers, or a sums_only method: {sums})")
