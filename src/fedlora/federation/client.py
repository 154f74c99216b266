"""The client half of a round, written once: prepare → fit → finish.

The simulator calls it for each sampled client in process; the Flower ClientApp calls it on a
SuperNode after decoding the plan. The method's client hooks and the trainer are the only parts.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from fedlora.methods.base import ClientPlan, ClientUpdate, Method
from fedlora.train.local import FitStats, LocalTrainer


def client_round(method: Method, trainer: LocalTrainer, sent: ClientPlan, train: Sequence[Any],
                 on_step: Callable[[float], None] | None = None) -> tuple[ClientPlan, ClientUpdate, FitStats]:
    """The plan as the client used it, its update ready for upload, and what the local work cost."""
    plan = method.client_prepare(sent)  # e.g. FFA-LoRA's A from its seed
    update, stats = trainer.fit(plan, train, on_step=on_step, regularizer=method.client_regularizer(plan))
    return plan, method.client_finish(plan, update), stats  # e.g. HETLoRA's pruning, Fed-PLoRA's indices
