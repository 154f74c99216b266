"""The one visible training loop: forward, loss, backward, clip, step (style.md lesson 6)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fedlora.config import TrainCfg
from fedlora.data.batching import length_grouped_batches
from fedlora.methods.base import ClientPlan, ClientUpdate, Regularizer
from fedlora.model.adapters import AdaLoraSpec, AdapterHost, read_factors
from fedlora.ops.lowrank import seeded_generator
from fedlora.train.precision import autocast, grad_scaler, resolve
from fedlora.train.tasks import CausalLM, Task


@dataclass
class FitStats:
    """What a client's local work cost and achieved."""

    train_loss: float  # mean answer-token loss over the round's steps
    steps: int
    real_tokens: int
    padded_tokens: int
    skipped_steps: int = 0  # float16: steps whose gradients overflowed, so the optimizer did not step (the scaler halved its scale)

    @property
    def padded_fraction(self) -> float:
        total = self.real_tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0


class LocalTrainer:
    """Trains one client's plan on the shared base model.

    A variant of the local adapter (``train/adalora.py``) overrides the three hooks below; the
    loop itself is the same for every adapter.
    """

    shrinks_rank = False
    """Whether an upload may come back at a lower rank than the plan's (AdaLoRA prunes while it trains)."""

    def __init__(
        self, host: AdapterHost, cfg: TrainCfg, target_modules: list[str], pad_id: int, device: torch.device, seed: int,
        dropout: float = 0.0, task: Task | None = None,
    ) -> None:
        self.task = task or CausalLM()
        self.host, self.cfg, self.target_modules = host, cfg, target_modules
        self.pad_id, self.device, self.seed, self.dropout = pad_id, device, seed, dropout
        self.compute_dtype = resolve(cfg.precision, device)  # None: float32

    def autocast(self):
        """The precision of this trainer's matrix multiplies, for training and for evaluation alike."""
        return autocast(self.compute_dtype, self.device)

    def adapter_spec(self, plan: ClientPlan) -> AdaLoraSpec | None:
        """The PEFT adapter kind for this plan: None is plain LoRA."""
        return None

    def extra_penalty(self, peft_model: torch.nn.Module) -> torch.Tensor | None:
        """A training penalty of the adapter kind itself (None: none)."""
        return None

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """After each optimizer step, before the gradients are cleared."""

    def fit(
        self, plan: ClientPlan, train: Sequence[Any],
        on_step: Callable[[float], None] | None = None, regularizer: Regularizer | None = None,
    ) -> tuple[ClientUpdate, FitStats]:
        """Bring the model's base up to the plan's version, fold the plan's round-only delta, train, read the factors."""
        self.host.catch_up(plan.base)
        self.host.set_delta(plan.fold)
        run_seed = int(seeded_generator(self.seed, plan.round, plan.client).initial_seed() % (2**31))
        try:
            with self.host.adapter(
                plan.rank, plan.scale, self.target_modules, init=plan.init, train_A=plan.train_A, train_B=plan.train_B, seed=run_seed,
                dropout=self.dropout, rank_pattern=plan.rank_pattern, adalora=self.adapter_spec(plan),
            ) as peft_model, torch.random.fork_rng(devices=[]):
                torch.manual_seed(run_seed)  # dropout draws are a function of (seed, round, client)
                if plan.head:
                    self.host.set_head(plan.head, trainable=True)
                live = self.host.live_factors(peft_model) if regularizer else {}  # the same parameters every step: looked up once
                penalties = [lambda: regularizer(live)] if regularizer else []
                if self.extra_penalty(peft_model) is not None:
                    penalties.append(lambda: self.extra_penalty(peft_model))
                penalty = (lambda: sum(p() for p in penalties)) if penalties else None
                stats = self._loop(peft_model, train, run_seed, on_step, penalty)
                factors = read_factors(self.host.lora_layers(peft_model), plan.scale)
                head = self.host.read_head() if plan.head else {}
        finally:
            self.host.restore()
        update = ClientUpdate(client=plan.client, num_examples=len(train), scale=plan.scale, factors=factors, train_loss=stats.train_loss, head=head)
        return update, stats

    def _loop(
        self, model: torch.nn.Module, train: Sequence[Any], seed: int,
        on_step: Callable[[float], None] | None, penalty: Callable[[], torch.Tensor] | None,
    ) -> FitStats:
        cfg = self.cfg
        task = self.task
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = grad_scaler(self.compute_dtype, self.device)  # float16 only
        scaled = scaler.scale if scaler else (lambda x: x)
        batches = length_grouped_batches([len(e.input_ids) for e in train], cfg.batch_size, seed)
        targets = [task.targets(e) for e in train]  # loss terms per example, counted once per client
        model.train()
        losses, real, padded, skipped = [], 0, 0, 0
        for step in range(cfg.local_steps):
            batch = batches[step % len(batches)]
            n_answer = max(sum(targets[i] for i in batch), 1)
            total = torch.zeros((), device=self.device)
            for start in range(0, len(batch), cfg.micro_batch_size):
                mb = task.collate([train[i] for i in batch[start : start + cfg.micro_batch_size]], self.pad_id)
                real, padded = real + mb.real_tokens, padded + mb.padded_tokens
                with self.autocast():
                    loss_sum, _ = task.loss_sum(model, mb, self.device)
                scaled(loss_sum / n_answer).backward()
                total += loss_sum.detach().float()  # stays on the device: no sync per micro-batch
            if penalty is not None:
                scaled(penalty()).backward()
            if scaler:
                scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            stepped = True
            if scaler:
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skipped when a gradient overflowed
                scaler.update()
                stepped = scaler.get_scale() >= scale  # the scale falls exactly when the step was skipped
            else:
                optimizer.step()
            if stepped:  # AdaLoRA's budgeting reads p·grad: never from a skipped step's inf gradients
                self.after_step(model, step)
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            losses.append(total / n_answer)
            if on_step:
                on_step(float(losses[-1]))  # the progress bar's one sync per step
        model.eval()
        mean = float(torch.stack(losses).double().mean()) if losses else math.nan
        return FitStats(train_loss=mean, steps=len(losses), real_tokens=real, padded_tokens=padded, skipped_steps=skipped)
