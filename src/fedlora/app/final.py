"""The run's final adapter(s) under ``RUN_DIR/final``, written the same way after the simulator and after Flower."""

from __future__ import annotations

import logging
from pathlib import Path

from fedlora.federation.server import Server
from fedlora.integrity import seal, write_folder
from fedlora.model.export import save_adapter
from fedlora.report.card import write_card

log = logging.getLogger(__name__)


def save_final(server: Server, folder: Path) -> None:
    """The global update as a PEFT adapter; per-client adapters ``client-<k>/`` for a personal method.

    Written aside and renamed into place once sealed (``write_folder``): a run killed while it saves keeps its
    previous ``final/`` or none, never a half-written one. A method whose clients keep part of their model
    (FedSA-LoRA's B) can only be written where that part is: in process, from the clients' kept state; over
    Flower each node writes its own.
    """
    write_folder(folder, lambda tmp: _write_final(server, tmp, folder))


def _write_final(server: Server, folder: Path, final: Path) -> None:
    exp = server.exp
    args = (exp.cfg.lora.target_modules,)
    if exp.method.keeps and not server.kept:
        log.info("final: each client's adapter stays with the client that holds its B (Flower: the node's state folder)")
        return
    if exp.method.personal:
        for c in exp.clients:
            save_adapter(exp.host, server.own_model(c.id), *args, folder / f"client-{c.id}", str(exp.model_dir))
            write_card(folder / f"client-{c.id}", folder.parent, exp.cfg, str(exp.model_dir), client=c.id)
            seal(folder / f"client-{c.id}")
        log.info("final per-client adapters in %s", final)
        return
    rank = save_adapter(exp.host, exp.method.global_delta(), *args, folder, str(exp.model_dir))
    write_card(folder, folder.parent, exp.cfg, str(exp.model_dir))
    seal(folder)  # SHA256SUMS: export and eval refuse a damaged copy
    log.info("final global adapter (rank %d, exact) in %s", rank, final)
