"""Every registered method through the Flower Strategy and ClientApp, in one process (no network).

An in-process grid hands each message to the real ClientApp object (roll call, train) with a
real Context, as a SuperNode would. The records are the real wire format, and the client state
goes through disk. Against the simulator on the same tiny random Llama, every method's global
update matches bit for bit, round by round.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from flwr.app import ArrayRecord, Context, Error, Message, MessageType, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from fedlora.app import checkpoint
from fedlora.config import load_config, packaged_config, to_yaml
from fedlora.data.formatting import ClassifiedExample
from fedlora.flower import client_app, runtime
from fedlora.flower.roster import Roster
from fedlora.flower.state import load_kept, state_dir
from fedlora.flower.strategy import FedLoraStrategy, RoundFailed
from fedlora.methods import REGISTRY, MethodError, Setup, build_method
from fedlora.model.adapters import AdapterHost
from fedlora.model.loading import head_modules, target_layer_shapes
from fedlora.federation.experiment import ClientData, Experiment
from fedlora.federation.server import Server
from fedlora.sim.federation import Hooks, Simulation
from fedlora.train.local import LocalTrainer
from fedlora.train.tasks import Classification
from tests.flower.conftest import dense
from tests.sim.test_simulation import _examples  # counting sequences

TARGETS = ["q_proj", "v_proj"]


def _labelled(n, seed):
    """Sequences whose class is their first token's parity."""
    return [ClassifiedExample(input_ids=e.input_ids, label=e.input_ids[0] % 2) for e in _examples(n, seed)]


def _experiment(model, name, ranks, extra=(), classify=False):
    cfg = load_config(packaged_config("tiny"), [f"lora.ranks={list(ranks)}", "federation.rounds=2", "train.local_steps=2", "train.lr=0.05",
                                                f"federation.method={name}", *extra])
    shapes = target_layer_shapes(model, TARGETS)
    setup = Setup(shapes, dict(enumerate(cfg.client_ranks())), dict(enumerate(cfg.client_scales())), seed=0)
    method = build_method(name, setup)
    data = _labelled if classify else _examples
    host = AdapterHost(model, list(shapes), head_modules=head_modules(model) if classify else None)
    trainer = LocalTrainer(host, cfg.train, TARGETS, 0, torch.device("cpu"), 0, task=Classification() if classify else None)
    clients = [ClientData(k, data(8 + 4 * k, k), data(4, 100 + k)) for k in range(3)]
    return Experiment(cfg, None, torch.device("cpu"), host, SimpleNamespace(pad_token_id=0), clients, data(6, 99), method, trainer, {}), setup


class InProcessGrid:
    """The two Grid calls the strategy makes, served by the real ClientApp object."""

    def __init__(self, nodes: dict[int, dict], dead: set[int] = frozenset()) -> None:
        self.nodes, self.dead, self.run_id = nodes, set(dead), 77

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as the real Grid does when it pushes
            node = msg.metadata.dst_node_id
            if node in self.dead and msg.metadata.message_type == MessageType.TRAIN:  # it answered the roll call, then died
                replies.append(Message(Error(code=5, reason="node unavailable"), reply_to=msg))
                continue
            ctx = Context(run_id=self.run_id, node_id=node, node_config=self.nodes[node], state=RecordDict(), run_config={})
            replies.append(client_app.app(message=msg, context=ctx))
        return replies


def _flower(exp, setup, tmp_path, monkeypatch, dead=(), resume_from=None, recorded=()):
    """The ServerApp's steps with the in-process grid; each node's runtime shares the experiment's model.

    ``resume_from``: a checkpoint folder to continue from, as a restarted ServerApp does (``recorded``: metrics.jsonl so far)."""
    client_methods = {}

    def fake_runtime(cfg_text, partition, num_partitions, data_path):
        method = client_methods.setdefault(partition, build_method(exp.cfg.federation.method, setup))  # the node's own method object
        pooled = method.pooled
        train = [e for c in exp.clients for e in c.train] if pooled else exp.clients[partition].train
        return runtime.ClientRuntime(exp.cfg, method, exp.trainer, train, exp.clients[partition].test, exp.global_test, 0)

    monkeypatch.setattr(runtime, "client_runtime", fake_runtime)
    for key, value in (("_run_id", 77), ("_node_id", 0), ("_task_id", 1)):  # what the ServerApp process would know
        monkeypatch.setattr(TaskIdentity, key, value)
    nodes = {1000 + k: {"partition-id": k, "num-partitions": 3, "state-dir": str(tmp_path / f"node-{k}")} for k in range(3)}
    grid = InProcessGrid(nodes, {1000 + k for k in dead})
    roster = Roster(3)
    roster.wait_for_all(grid, timeout=5)
    records, deltas, heads = [], {}, {}

    def record(entry):
        records.append(entry)
        deltas[entry["round"]] = dense(exp.method.global_delta())
        heads[entry["round"]] = {k: {n: t.clone() for n, t in h.items()} for k, h in strategy.server.heads.heads.items()}

    server, start = Server(exp), 0
    if resume_from is not None:
        done = checkpoint.load(resume_from, server, list(recorded))
        start = done[-1]["round"]
    strategy = FedLoraStrategy(server, roster, to_yaml(exp.cfg), record, checkpoints=tmp_path / "checkpoints", start_round=start, lines=start + 1 if start else 0)
    strategy.start(grid, ArrayRecord(), num_rounds=exp.cfg.federation.rounds - start, timeout=5, evaluate_fn=strategy.evaluate)
    exp.flower_server = strategy.server  # what the ServerApp held at the end
    return records, deltas, heads


def _ranks(name):
    try:
        build_method(name, Setup({"x": (4, 4)}, {0: 4, 1: 2, 2: 1}, {k: 2.0 for k in range(3)}))
        return (4, 2, 1)
    except MethodError:
        return (2, 2, 2)


def _same_as_simulator(model, name, ranks, tmp_path, monkeypatch, classify=False):
    """``model``: a module, or a factory of identical fresh ones (a classifier's head is trained in place)."""
    fresh = model if callable(model) and not isinstance(model, torch.nn.Module) else (lambda: model)
    exp, _ = _experiment(fresh(), name, ranks, classify=classify)
    sim_records, sim_deltas, sim_heads = [], {}, {}

    def sim_round_end(e):
        sim_deltas[e["round"]] = dense(exp.method.global_delta())
        sim_heads[e["round"]] = {k: {n: t.clone() for n, t in h.items()} for k, h in sim.heads.items()}

    sim = Simulation(exp, Hooks(round_end=sim_round_end))
    sim.run(sim_records.append)
    exp.host.reset_base()  # a shared model back to W_0: the simulator left it at its merged base

    exp, setup = _experiment(fresh(), name, ranks, classify=classify)
    records, deltas, heads = _flower(exp, setup, tmp_path, monkeypatch)
    assert [r["round"] for r in records] == [0, 1, 2]
    for f, s in zip(records, sim_records, strict=True):
        assert set(s) <= set(f)
        assert f["eval"] == s["eval"]
        for key in ("bytes_up", "bytes_down", "agg_noise", "init_noise", "weights", "local_rank_sum"):
            assert f.get(key) == s.get(key), key
        for fc, sc in zip(f["clients"], s["clients"], strict=True):
            assert {k: fc[k] for k in sc if k != "padded_fraction"} == {k: v for k, v in sc.items() if k != "padded_fraction"}
    for rnd, d in sim_deltas.items():
        assert set(deltas[rnd]) == set(d) and all(torch.equal(deltas[rnd][n], d[n]) for n in d), f"round {rnd}"
        for k, head in sim_heads[rnd].items():
            assert set(heads[rnd][k]) == set(head) and all(torch.equal(heads[rnd][k][n], head[n]) for n in head), f"round {rnd} head"
    if exp.method.keeps:  # what each client keeps lives on its node, and equals the simulator's in-process clients'
        assert sim.server.kept and not exp.flower_server.kept  # over Flower the server holds nothing a client keeps
        for k, own in sim.server.kept.items():
            on_node = load_kept(state_dir(tmp_path / f"node-{k}", "run", k), exp.cfg.federation.rounds + 1)
            assert on_node.keys() == own.keys() and all(torch.equal(on_node[n], own[n]) for n in own), k
        losses = [c["loss"] for c in records[-1]["eval"]["clients"].values()]
        assert len(set(losses)) == len(losses)  # one model per client
    return records


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_flower_strategy_and_clientapp_equal_the_simulator_for_every_method(tiny_llama, tmp_path, monkeypatch, name):
    records = _same_as_simulator(tiny_llama, name, _ranks(name), tmp_path, monkeypatch)  # compares every round with the simulator's
    assert [len(r["clients"]) for r in records[1:]] == [1 if name == "centralized" else 3] * 2 and all("eval" in r for r in records)


@pytest.mark.parametrize("name", ["flora", "local"])
def test_flower_classifier_head_travels_and_is_averaged_as_in_the_simulator(tiny_classifier, tmp_path, monkeypatch, name):
    """Classification: the dense head goes down with the plan, up with the update, and is FedAvg'd (per client when personal)."""
    records = _same_as_simulator(tiny_classifier, name, (4, 2, 1), tmp_path, monkeypatch, classify=True)
    assert "accuracy" in records[-1]["eval"]["global"]
    assert all(c["bytes_up"] > 0 or name == "local" for c in records[1]["clients"])


@pytest.fixture
def tiny_classifier():
    """A factory of identical tiny random Llamas with a 2-class score head, in float64."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def build():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, num_labels=2, pad_token_id=0)
        model = LlamaForSequenceClassification(cfg).to(torch.float64).eval()
        model.requires_grad_(False)
        return model

    return build


def test_flower_round_goes_on_without_a_lost_client_and_fails_below_min_clients(tiny_llama, tmp_path, monkeypatch):
    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.min_clients=2"])
    records, _, _ = _flower(exp, setup, tmp_path / "a", monkeypatch, dead=[1])
    for r in records[1:]:
        assert [c["id"] for c in r["clients"]] == [0, 2] and [x["id"] for x in r["lost"]] == [1]
        assert "node unavailable" in r["lost"][0]["error"] and r["agg_noise"] < 1e-6
    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.min_clients=3"])
    with pytest.raises(RoundFailed, match="min_clients=3"):
        _flower(exp, setup, tmp_path / "b", monkeypatch, dead=[1])



def test_flower_fedsa_resumed_after_a_lost_round_starts_each_client_from_its_b_before_that_round(tiny_llama, tmp_path, monkeypatch):
    """A ServerApp restarted from its round-2 checkpoint reruns round 3; the nodes hold B files from the lost
    round 3 (here made wrong on purpose): each client must start round 3 again from its round-2 B."""
    exp, setup = _experiment(tiny_llama, "fedsa", (2, 2, 2), ["federation.rounds=3"])
    whole, _, _ = _flower(exp, setup, tmp_path, monkeypatch)
    assert [p.name for p in checkpoint.complete(tmp_path / "checkpoints")] == ["round-0002", "round-0003"]
    shutil.rmtree(tmp_path / "checkpoints" / "round-0003")  # the ServerApp died before this checkpoint
    for k in range(3):
        lost = state_dir(tmp_path / f"node-{k}", "run", k) / "kept-r3.safetensors"
        save_file({n: t * 7 + 1 for n, t in load_file(lost).items()}, str(lost))  # a B that round 3 must not start from
    exp, setup = _experiment(tiny_llama, "fedsa", (2, 2, 2), ["federation.rounds=3"])
    rest, _, _ = _flower(exp, setup, tmp_path, monkeypatch, resume_from=tmp_path / "checkpoints" / "round-0002", recorded=whole[:3])
    assert [r["round"] for r in rest] == [3]
    again, first = rest[0], whole[3]
    assert again["eval"] == first["eval"] and again["weights"] == first["weights"]
    assert [c["train_loss"] for c in again["clients"]] == [c["train_loss"] for c in first["clients"]]
