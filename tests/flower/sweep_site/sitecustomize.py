"""Test-only kill points for the kill sweep (tests/flower/test_kill_sweep.py); never on a user's path.

The sweep puts this folder on ``PYTHONPATH`` for one deployment, so every Python process of that deployment (the
launcher, the SuperLink, the SuperNodes, the ServerApp, the ClientApps, Ray's workers) imports it at start-up. With
``FEDLORA_SWEEP=<point>:<round>`` and ``FEDLORA_SWEEP_DIR=<folder>`` in the environment it wraps production
functions as their modules are imported (an import hook: nothing is imported early, production code carries no
test hook), and the first process that reaches the point stops there: it writes ``<folder>/reached`` (its pid, the
point, its command line), then waits until ``<folder>/release`` exists. The sweep kills its target meanwhile, so the
target dies at exactly that point. Without ``FEDLORA_SWEEP`` this module does nothing.

Points (the round is the round in progress):

- ``round0:1``: the ServerApp, round 0 recorded and checkpointed, before round 1's plans are made (``configure_train``);
- ``mid-round:<t>``: partition 1's ClientApp, its plan for round t received, before it trains (``client_round``);
- ``checkpoint:<t>``: the ServerApp, round t's ``state.safetensors`` written and fsynced in its hidden temporary
  folder, ``state.json`` not yet (``checkpoint._fsync``);
- ``final:0``: the ServerApp, the final adapter's weights written, its card and checksums not yet (``final.write_card``).
"""

from __future__ import annotations

import os

SPEC = os.environ.get("FEDLORA_SWEEP")
FOLDER = os.environ.get("FEDLORA_SWEEP_DIR")
PARTITION = 1  # the ClientApp that stops mid-round: the one the SuperNode target kills (node-1)


def _stop_here(what: str) -> None:
    """The first process to arrive writes ``reached`` and waits for ``release`` (15 min at most); later ones go on."""
    import json
    import sys
    import time

    path = os.path.join(FOLDER, "reached")
    try:
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "point": SPEC, "what": what, "argv": sys.argv[:3]}, f)
    os.replace(path + ".tmp", path)
    deadline = time.monotonic() + 900
    while not os.path.exists(os.path.join(FOLDER, "release")) and time.monotonic() < deadline:
        time.sleep(0.05)


def _patch(module) -> None:  # noqa: ANN001
    point, _, at = SPEC.partition(":")
    at = int(at or 0)
    name = module.__name__
    if point == "round0" and name == "fedlora.flower.strategy":
        configure = module.FedLoraStrategy.configure_train

        def configure_train(self, server_round, *args, **kwargs):  # noqa: ANN001, ANN202
            if self.start_round + server_round == at:
                _stop_here(f"ServerApp before round {at}'s plans")
            return configure(self, server_round, *args, **kwargs)

        module.FedLoraStrategy.configure_train = configure_train
    elif point == "mid-round" and name == "fedlora.federation.client":
        client_round = module.client_round

        def client_round_at(method, trainer, sent, *args, **kwargs):  # noqa: ANN001, ANN202
            if sent.round == at and sent.client == PARTITION:
                _stop_here(f"ClientApp of partition {PARTITION} before it trains in round {at}")
            return client_round(method, trainer, sent, *args, **kwargs)

        module.client_round = client_round_at
    elif point == "checkpoint" and name == "fedlora.app.checkpoint":
        fsync = module._fsync

        def fsync_then_stop(path):  # noqa: ANN001, ANN202
            fsync(path)
            if path.name == "state.safetensors" and path.parent.name.startswith(f".round-{at:04d}.tmp-"):
                _stop_here(f"ServerApp writing checkpoint round-{at:04d}: tensors written, state.json not yet")

        module._fsync = fsync_then_stop
    elif point == "final" and name == "fedlora.app.final":
        write_card = module.write_card

        def card_after_stop(folder, *args, **kwargs):  # noqa: ANN001, ANN202
            _stop_here("ServerApp writing final/: adapter weights written, card and SHA256SUMS not yet")
            return write_card(folder, *args, **kwargs)

        module.write_card = card_after_stop


WATCHED = {"fedlora.flower.strategy", "fedlora.federation.client", "fedlora.app.checkpoint", "fedlora.app.final"}

if SPEC and FOLDER:
    import importlib.abc
    import importlib.machinery
    import sys

    class _Loader(importlib.abc.Loader):
        def __init__(self, inner) -> None:  # noqa: ANN001
            self.inner = inner

        def create_module(self, spec):  # noqa: ANN001, ANN201
            return self.inner.create_module(spec)

        def exec_module(self, module) -> None:  # noqa: ANN001
            self.inner.exec_module(module)
            _patch(module)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
            if fullname not in WATCHED:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
            return spec

    sys.meta_path.insert(0, _Finder())
