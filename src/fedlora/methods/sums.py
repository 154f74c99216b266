"""Methods whose aggregate is a weighted mean of named tensors that each client contributes (``sums_only``).

FedIT (Σ w_k B_k, Σ w_k A_k), FFA-LoRA and ``full`` (Σ w_k B_k), FedSA-LoRA (Σ w_k A_k), RoLoRA
(the factor that trained) and the centralized reference declare two things and nothing else:

- ``contribution(update, round)``: the named tensors T_k that client k adds to the round's sums;
- ``from_means(means, round)``: the next state from the means Σ_k w_k T_k / Σ_k w_k.

Everything in between belongs to the round, not to the method: weighing, summing and whatever a
wrapper does to a contribution or to the sums (clipping, noise, secure summation; federation/seam.py).
Because the server needs only the sums, these methods can be summed where no one sees a single
client's tensors.
"""

from __future__ import annotations

import torch

from fedlora.methods.base import ClientUpdate, Factors
from fedlora.methods.folding import Folds, Sum, add_weighted
from fedlora.ops.weights import Weighting


class Sums(Folds):
    """A ``sums_only`` method: declares its contributions and how the state follows from their means."""

    sums_only = True
    weighting = Weighting()  # n_k → w_k (the ``weights`` option of a method that has it)

    def contribution(self, update: ClientUpdate, round: int) -> dict[str, torch.Tensor]:
        """The named tensors T_k that this client adds to the round's weighted sums."""
        raise NotImplementedError

    def from_means(self, means: dict[str, torch.Tensor], round: int) -> None:
        """Replace the state from Σ_k w_k T_k / Σ_k w_k (the tensors are the caller's to keep)."""
        raise NotImplementedError

    def weigh(self, weight: float) -> float:
        """w_k as this method applies it (its ``Weighting``: the example count, 1, or the count capped)."""
        return self.weighting.weigh(weight)

    def begin(self, round: int) -> Sum:
        return Sum(round)

    def fold(self, acc: Sum, u: ClientUpdate, weight: float) -> None:
        w = self.weigh(weight)
        acc.add(u.client, w)
        for key, t in self.contribution(u, acc.round).items():
            add_weighted(acc.layers, key, t, w, self.setup.dtype)

    def commit(self, acc: Sum) -> None:
        norm = acc.norm()
        self.from_means({key: t.mul_(norm) for key, t in acc.layers.items()}, acc.round)


class SumsB(Sums):
    """For methods whose whole state is one averaged B per layer (FFA-LoRA, ``full``): B̄ = Σ w_k B_k / Σ w_k."""

    B: dict[str, torch.Tensor]

    def contribution(self, update: ClientUpdate, round: int) -> dict[str, torch.Tensor]:
        return {name: update.factors[name].B for name in self.setup.layers}

    def from_means(self, means: dict[str, torch.Tensor], round: int) -> None:
        self.B = {name: means[name] for name in self.setup.layers}


class SumsBA(Sums):
    """For methods whose state is one averaged pair per layer (FedIT, the centralized reference): B̄ and Ā."""

    factors: dict[str, Factors]

    def contribution(self, update: ClientUpdate, round: int) -> dict[str, torch.Tensor]:
        """B_k and A_k of every layer."""
        out = {}
        for name in self.factors:
            out[name + ".B"], out[name + ".A"] = update.factors[name].B, update.factors[name].A
        return out

    def from_means(self, means: dict[str, torch.Tensor], round: int) -> None:
        """B̄ = Σ w_k B_k / Σ w_k, Ā = Σ w_k A_k / Σ w_k."""
        self.factors = {name: Factors(B=means[name + ".B"], A=means[name + ".A"]) for name in self.factors}
