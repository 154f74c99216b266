"""Progress bars for rounds and client steps (rich), fed by the simulation's hooks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedlora.config import Config
from fedlora.sim.federation import Hooks


@contextmanager
def rich_hooks(console: Console, cfg: Config) -> Iterator[Hooks]:
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    )
    rounds = progress.add_task("rounds", total=cfg.federation.rounds + 1, info="evaluating round 0")
    steps = progress.add_task("client", total=cfg.train.local_steps, info="", visible=False)

    def round_start(rnd: int, clients: list[int]) -> None:
        progress.update(rounds, info=f"round {rnd}: clients {clients}")

    def client_start(client: int, n: int) -> None:
        rank = cfg.client_ranks()[client]
        progress.reset(steps, total=n, description=f"client {client} (r={rank})", visible=True, info="")

    def step(loss: float) -> None:
        progress.update(steps, advance=1, info=f"loss {loss:.3f}")

    def round_end(entry: dict[str, Any]) -> None:
        loss = entry.get("eval", {}).get("global", {}).get("loss")
        text = f"round {entry['round']} done" + (f" · global loss {loss:.4f}" if loss is not None else "")
        progress.update(rounds, advance=1, info=text)
        progress.console.log(text)

    with progress:
        yield Hooks(round_start=round_start, client_start=client_start, step=step, round_end=round_end)
