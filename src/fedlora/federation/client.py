"""The client half of a round, written once: prepare → start from what it kept → fit → finish → keep.

The simulator calls it for each sampled client in process; the Flower ClientApp calls it on a
SuperNode after decoding the plan. The method's client hooks and the trainer are the only parts.
``client_evaluate`` is the client's own evaluation, for methods whose model lives partly on the
client (``Method.keeps``: FedSA-LoRA's B never reaches the server).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Kept, Method
from fedlora.train.local import FitStats, LocalTrainer


def client_round(method: Method, trainer: LocalTrainer, sent: ClientPlan, train: Sequence[Any], kept: Kept | None = None,
                 on_step: Callable[[float], None] | None = None) -> tuple[ClientPlan, ClientUpdate, FitStats, Kept | None]:
    """The plan as the client used it, its update ready for upload, what the local work cost, what it keeps."""
    plan = method.client_start(method.client_prepare(sent), kept)  # e.g. FFA-LoRA's A from its seed, FedSA's own B
    update, stats = trainer.fit(plan, train, on_step=on_step, regularizer=method.client_regularizer(plan))
    update = method.client_finish(plan, update)  # e.g. HETLoRA's pruning, Fed-PLoRA's indices
    return plan, update, stats, method.client_keep(plan, update)


def client_evaluate(method: Method, trainer: LocalTrainer, sent: ClientPlan, kept: Kept | None,
                    splits: Mapping[str, Sequence[Any]], batch_size: int, pad_id: int) -> dict[str, dict[str, float]]:
    """The client's own model (the plan it would start from, with what it kept) scored on each split."""
    plan = method.client_start(method.client_prepare(sent), kept)
    host = trainer.host
    host.catch_up(plan.base)
    own = method.client_model(plan)
    host.set_delta({n: [*plan.fold.get(n, []), *own.get(n, [])] for n in {*plan.fold, *own}})
    try:
        if plan.head:
            host.set_head(plan.head)
        with trainer.autocast():
            return {name: trainer.task.evaluate(host.model, data, batch_size, pad_id, trainer.device) for name, data in splits.items() if data}
    finally:
        host.restore()


def own_model(method: Method, sent: ClientPlan, kept: Kept | None) -> Delta:
    """The client's own model over its base: what it kept, completed by the shared part the plan carries."""
    return method.client_model(method.client_start(method.client_prepare(sent), kept))
