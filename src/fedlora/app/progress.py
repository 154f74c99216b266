"""Progress for rounds and client steps, fed by the simulation's hooks: bars on a terminal, plain lines in a log."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedlora.config import Config
from fedlora.report.table import round_line
from fedlora.sim.federation import Hooks


log = logging.getLogger("fedlora")


def plain_hooks(cfg: Config) -> Hooks:
    """One log line per client and per round, for output that is a file or a pipe (no bars, no wrapping)."""

    def client_start(client: int, n: int) -> None:
        log.info("round %d: client %d (r=%d), %d steps", rnd[0], client, cfg.client_ranks()[client], n)

    def round_start(r: int, clients: list[int]) -> None:
        rnd[0] = r

    rnd = [0]
    return Hooks(round_start=round_start, client_start=client_start, round_end=lambda entry: log.info(round_line(entry)))


@contextmanager
def rich_hooks(console: Console, cfg: Config) -> Iterator[Hooks]:
    if not console.is_terminal:
        yield plain_hooks(cfg)
        return
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
        text = round_line(entry)
        progress.update(rounds, advance=1, info=text)
        progress.console.log(text)

    with progress:
        yield Hooks(round_start=round_start, client_start=client_start, step=step, round_end=round_end)
