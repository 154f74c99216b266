"""``python -m tests.e2e.killed <point>:<round> ARGS…``: ``fedlora ARGS…``, SIGKILLed at a named point.

The kill points are installed from here, by wrapping production functions, so the production
loop carries no test hook: ``mid-round`` (after the round's first reply is folded in),
``mid-checkpoint`` (the tensors written, the JSON not yet) and ``after-checkpoint``.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, round: int) -> None:
    from fedlora.app import checkpoint
    from fedlora.federation import server

    if point == "mid-round":
        receive = server.Server.receive

        def receive_then_die(self, rnd, arrival):
            receive(self, rnd, arrival)
            if rnd.number == round:
                _die()

        server.Server.receive = receive_then_die
    elif point == "mid-checkpoint":
        fsync = checkpoint._fsync

        def fsync_then_die(path):
            fsync(path)
            if path.name == "state.safetensors" and path.parent.name.startswith(f".round-{round:04d}"):
                _die()

        checkpoint._fsync = fsync_then_die
    elif point == "after-checkpoint":
        save = checkpoint.save

        def save_then_die(folder, owner, number, *args, **kwargs):
            out = save(folder, owner, number, *args, **kwargs)
            if number == round:
                _die()
            return out

        checkpoint.save = save_then_die
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    spec, *args = sys.argv[1:]
    name, _, at = spec.partition(":")
    install(name, int(at))
    from fedlora.cli import main

    raise SystemExit(main(args))
