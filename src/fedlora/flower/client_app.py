"""The ClientApp: one partition's side of a round, the same steps as the simulator's client.

``query`` answers the server's roll call (partition id, partition count, declared rank: the
server cannot read node config). ``train`` decodes the plan, runs the method's client hooks
through ``federation.client.client_round`` (client_prepare → catch-up + train with the client
regularizer → client_finish), stores the client's base (D_v, bounded) on node-local disk (a fresh process serves every
message) and replies with the update, its partition id and rank.

Node config: ``partition-id``, ``num-partitions``, optional ``rank``, ``data-path``, ``state-dir``.
"""

from __future__ import annotations

import os
import time
from logging import INFO
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from fedlora.flower.settings import ENV, NodeSettings  # light: the roll call imports no torch

for _key, _value in ENV.items():  # before torch / transformers are imported
    os.environ.setdefault(_key, _value)

NODE = "node"
"""ConfigRecord of a roll-call reply: partition-id, num-partitions, rank (0 = the config's), own-data."""
RUN = "fedlora"
"""ConfigRecord of a train message: ``config`` = the server's resolved config as YAML; ``run`` = the
run's key (its folder's name and a hash of its path), which names the node's saved base, so a restarted ServerApp
continuing that run finds every node's base where it left it."""

app = ClientApp()


@app.query()
def roll_call(msg: Message, context: Context) -> Message:
    node = NodeSettings.from_node_config(context.node_config)
    info = ConfigRecord({"partition-id": node.partition, "num-partitions": node.num_partitions, "rank": node.rank or 0, "own-data": node.data_path is not None})
    return Message(RecordDict({NODE: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    from fedlora.federation.client import client_round
    from fedlora.flower.records import records_to_plan, update_to_records
    from fedlora.flower.runtime import client_runtime
    from fedlora.flower.state import load_kept, load_state, save_kept, save_state, state_dir

    t0 = time.time()
    _set_threads()
    node = NodeSettings.from_node_config(context.node_config)
    rt = client_runtime(str(msg.content.config_records[RUN]["config"]), node.partition, node.num_partitions, node.data_path)
    sent = records_to_plan(msg.content)
    if sent.client != node.partition:
        raise RuntimeError(f"plan for partition {sent.client} reached the node holding partition {node.partition}")
    t_loaded = time.time()
    torch.manual_seed(rt.cfg.seed)
    folder = state_dir(node.state_root, str(msg.content.config_records[RUN]["run"]), node.partition)
    rt.trainer.host.load_base(*load_state(folder))
    plan, update, stats, kept = client_round(rt.method, rt.trainer, sent, rt.train, load_kept(folder, sent.round))
    save_state(folder, *rt.trainer.host.base_state())  # before replying: the server may count on this base next round
    if kept is not None:
        save_kept(folder, sent.round, kept)  # never sent: the next round starts from it
    t_fit = time.time()
    timing = {"startup-s": t0 - _process_start(), "load-s": t_loaded - t0, "fit-s": t_fit - t_loaded}
    log(INFO, "partition %d round %d: rank %d, %d examples, loss %.4f; %s", node.partition, plan.round, plan.rank,
        update.num_examples, update.train_loss, ", ".join(f"{k} {v:.1f}" for k, v in timing.items()))
    content = update_to_records(
        update, upload=plan.upload, wire=rt.cfg.federation.wire_dtype, node_rank=node.rank or rt.cfg.client_ranks()[node.partition],
        stats={"padded-fraction": stats.padded_fraction, "steps": stats.steps, "skipped-steps": stats.skipped_steps, **timing},
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The client's own model (what it kept plus the shared part the server sent) on its test split and the global one.

    After the last round it also writes that model as a PEFT adapter to ``<state folder>/final``:
    only the node holds its B."""
    from flwr.app import MetricRecord

    from fedlora.federation.client import client_evaluate
    from fedlora.flower.records import records_to_plan
    from fedlora.flower.runtime import client_runtime
    from fedlora.flower.state import load_kept, load_state, state_dir

    _set_threads()
    node = NodeSettings.from_node_config(context.node_config)
    rt = client_runtime(str(msg.content.config_records[RUN]["config"]), node.partition, node.num_partitions, node.data_path)
    sent = records_to_plan(msg.content)
    folder = state_dir(node.state_root, str(msg.content.config_records[RUN]["run"]), node.partition)
    rt.trainer.host.load_base(*load_state(folder))
    kept = load_kept(folder, sent.round)
    splits = {"test": rt.test, "global": rt.global_test} if rt.cfg.eval.scores_clients(sent.round - 1, rt.cfg.federation.rounds) else {"global": rt.global_test}
    scores = client_evaluate(rt.method, rt.trainer, sent, kept, splits, rt.cfg.eval.batch_size, rt.pad_id)
    if sent.round > rt.cfg.federation.rounds and rt.cfg.output.save_final and rt.model_dir is not None:
        from fedlora.federation.client import own_model
        from fedlora.integrity import seal, write_folder
        from fedlora.model.export import save_adapter

        def write(final: Path) -> None:
            save_adapter(rt.trainer.host, own_model(rt.method, sent, kept), rt.cfg.lora.target_modules, final, str(rt.model_dir))
            seal(final)

        write_folder(folder / "final", write)  # never a half-written final/, whenever the ClientApp is killed
    metrics = MetricRecord({f"{split}/{key}": float(v) for split, s in scores.items() for key, v in s.items()})
    return Message(RecordDict({"eval": metrics, NODE: ConfigRecord({"partition-id": node.partition})}), reply_to=msg)


def _set_threads() -> None:
    """On Flower's simulation runtime, the client's CPU share (Ray sets OMP_NUM_THREADS only where it was unset)."""
    from fedlora.flower.settings import THREADS_ENV

    if os.environ.get(THREADS_ENV):
        import torch

        torch.set_num_threads(int(os.environ[THREADS_ENV]))


def _process_start() -> float:
    """When this ClientApp process started (its interpreter start-up and imports count as load time)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except ImportError:  # pragma: no cover - psutil comes with peft
        return time.time()
