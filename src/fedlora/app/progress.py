"""Progress for rounds and client steps, fed by the simulation's hooks: bars on a terminal, plain lines in a log."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedlora.config import Config
from fedlora.report.table import round_line
from fedlora.sim.federation import Hooks


log = logging.getLogger("fedlora")


HEARTBEAT_S = 60.0


class Heartbeat:
    """Off a terminal, a line when nothing was logged for a minute: a long evaluation must not look hung."""

    def __init__(self, every: float = HEARTBEAT_S) -> None:
        """``every`` = 0: only keeps the phase, no thread."""
        self.every, self.last, self.doing = every, time.monotonic(), "evaluating before round 1"
        self.stop = threading.Event()
        if every > 0:
            threading.Thread(target=self._beat, daemon=True, name="fedlora-heartbeat").start()

    def now(self, doing: str) -> None:
        self.last, self.doing = time.monotonic(), doing

    def _beat(self) -> None:
        while not self.stop.wait(self.every / 4):
            quiet = time.monotonic() - self.last
            if quiet >= self.every:
                log.info("… still %s (%.0f s since the last line)", self.doing, quiet)
                self.last = time.monotonic()


def eta_line(entry: dict[str, Any], walls: list[float], rounds: int) -> str | None:
    """After the first trained round, and then every tenth: about how long the rest should take."""
    number = entry["round"]
    if number < 1 or number == rounds or not (number == 1 or number % 10 == 0):
        return None
    left = (rounds - number) * sum(walls) / len(walls)
    return f"about {left / 60:.0f} min left for rounds {number + 1}–{rounds} (at {sum(walls) / len(walls):.1f} s a round so far)"


def plain_hooks(cfg: Config, beat: Heartbeat | None = None) -> Hooks:
    """One log line per client and per round, a time estimate (and the heartbeat's phase): for output that is a file or a pipe."""
    beat = beat or Heartbeat(every=0)
    walls: list[float] = []
    rnd = [0]
    log.info("evaluating before round 1: the global test split and %d clients' own (at most %s examples each)",
             cfg.federation.num_clients, cfg.eval.max_examples or "all")

    def client_start(client: int, n: int) -> None:
        beat.now(f"training client {client} in round {rnd[0]}")
        log.info("round %d: client %d (r=%d), %d steps", rnd[0], client, cfg.client_ranks()[client], n)

    def round_start(r: int, clients: list[int]) -> None:
        rnd[0] = r
        beat.now(f"in round {r}")

    def round_end(entry: dict[str, Any]) -> None:
        log.info(round_line(entry))
        if entry["round"] > 0:
            walls.append(float(entry.get("wall_s", 0.0)))
        if line := eta_line(entry, walls, cfg.federation.rounds):
            log.info(line)
        beat.now(f"after round {entry['round']}")

    return Hooks(round_start=round_start, client_start=client_start, round_end=round_end)


@contextmanager
def rich_hooks(console: Console, cfg: Config) -> Iterator[Hooks]:
    if not console.is_terminal:
        beat = Heartbeat()
        try:
            yield plain_hooks(cfg, beat)
        finally:
            beat.stop.set()
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
