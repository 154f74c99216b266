"""Every registered method through the Flower Strategy and ClientApp, in one process (no network).

An in-process grid hands each message to the real ClientApp object (roll call, train) with a
real Context, as a SuperNode would. The records are the real wire format, and the client state
goes through disk. Against the simulator on the same tiny random Llama, every method's global
update matches bit for bit, round by round.
"""

from __future__ import annotations

import json
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
from fedlora.flower.state import NodeStateError, load_kept, state_dir
from fedlora.flower.strategy import FedLoraStrategy, RoundFailed
from fedlora.methods import REGISTRY, Setup, build_method
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
    """The two Grid calls the strategy makes, served by the real ClientApp object.

    ``dead``: nodes whose train messages fail; ``fail_in``: a round whose train messages all fail (the round fails)."""

    def __init__(self, nodes: dict[int, dict], dead: set[int] = frozenset(), fail_in: int | None = None) -> None:
        self.nodes, self.dead, self.fail_in, self.run_id = nodes, set(dead), fail_in, 77

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as the real Grid does when it pushes
            node = msg.metadata.dst_node_id
            dead = node in self.dead or msg.metadata.group_id == str(self.fail_in)
            if dead and msg.metadata.message_type == MessageType.TRAIN:  # it answered the roll call, then died
                replies.append(Message(Error(code=5, reason="node unavailable"), reply_to=msg))
                continue
            ctx = Context(run_id=self.run_id, node_id=node, node_config=self.nodes[node], state=RecordDict(), run_config={})
            try:
                replies.append(client_app.app(message=msg, context=ctx))
            except NodeStateError as e:  # a SuperNode sends a ClientApp's exception back as an error reply, its text in the reason
                replies.append(Message(Error(code=3, reason=f"{type(e)}:<'{e}'>"), reply_to=msg))
        return replies


def _flower(exp, setup, tmp_path, monkeypatch, dead=(), resume_from=None, recorded=(), fail_in=None, records=None):
    """The ServerApp's steps with the in-process grid; each node's runtime shares the experiment's model.

    ``resume_from``: a checkpoint folder to continue from, as a restarted ServerApp does (``recorded``: metrics.jsonl so far);
    ``fail_in``: the round whose every train message fails, so the run stops there (RoundFailed) as a killed ServerApp
    would; ``records``: a list that gets each line as it is recorded, also from a run that stops."""
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
    grid = InProcessGrid(nodes, {1000 + k for k in dead}, fail_in)
    roster = Roster(3)
    roster.wait_for_all(grid, timeout=5)
    records, deltas, heads = [] if records is None else records, {}, {}

    def record(entry):
        records.append(entry)
        deltas[entry["round"]] = dense(exp.method.global_delta())
        heads[entry["round"]] = {k: {n: t.clone() for n, t in h.items()} for k, h in strategy.server.heads.heads.items()}

    server, done = Server(exp), []
    if resume_from is not None:
        done = checkpoint.load(resume_from, server, list(recorded))
    start = done[-1]["round"] if done else 0  # as the ServerApp computes them (server_app.main)
    keep = lambda entry, lines: checkpoint.save(tmp_path / "checkpoints", server, entry["round"], lines, entry)  # noqa: E731 (as the ServerApp keeps them)
    strategy = FedLoraStrategy(server, roster, to_yaml(exp.cfg), record, keep=keep, start_round=start, lines=len(done))
    strategy.start(grid, ArrayRecord(), num_rounds=exp.cfg.federation.rounds - start, timeout=5, evaluate_fn=strategy.evaluate)
    exp.flower_server = strategy.server  # what the ServerApp held at the end
    return records, deltas, heads


def _ranks(name):
    return (2, 2, 2) if REGISTRY[name].ranks == "one" else (4, 2, 1)


def _same_as_simulator(model, name, ranks, tmp_path, monkeypatch, classify=False, extra=()):
    """``model``: a module, or a factory of identical fresh ones (a classifier's head is trained in place)."""
    fresh = model if callable(model) and not isinstance(model, torch.nn.Module) else (lambda: model)
    exp, _ = _experiment(fresh(), name, ranks, extra, classify=classify)
    sim_records, sim_deltas, sim_heads = [], {}, {}

    def sim_round_end(e):
        sim_deltas[e["round"]] = dense(exp.method.global_delta())
        sim_heads[e["round"]] = {k: {n: t.clone() for n, t in h.items()} for k, h in sim.heads.items()}

    sim = Simulation(exp, Hooks(round_end=sim_round_end))
    sim.run(sim_records.append)
    exp.host.reset_base()  # a shared model back to W_0: the simulator left it at its merged base

    exp, setup = _experiment(fresh(), name, ranks, extra, classify=classify)
    records, deltas, heads = _flower(exp, setup, tmp_path, monkeypatch)
    assert [r["round"] for r in records] == [0, 1, 2]
    for f, s in zip(records, sim_records, strict=True):
        assert set(s) <= set(f)
        assert f["eval"] == s["eval"]
        for key in ("bytes_up", "bytes_down", "agg_noise", "init_noise", "weights", "local_rank_sum", "clipped", "privacy"):
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


@pytest.mark.parametrize("name", sorted(n for n, cls in REGISTRY.items() if cls.sums_only))
def test_flower_a_wrapper_at_the_seam_clips_as_in_the_simulator_for_every_sums_only_method(tiny_llama, tmp_path, monkeypatch, name):
    """federation.wrappers = clip, tight enough to scale clients down: both transports clip the same clients and
    end bit for bit on the same global model (the wrapper sits in the server half both share)."""
    records = _same_as_simulator(tiny_llama, name, _ranks(name), tmp_path, monkeypatch, extra=["federation.wrappers=[{use: clip, max_norm: 0.05}]"])
    assert any(r.get("clipped") for r in records[1:]), [r.get("clipped") for r in records]


def test_flower_client_level_dp_adds_the_simulators_noise_and_reports_the_same_epsilon(tiny_llama, tmp_path, monkeypatch):
    """privacy.mode=client: the server half both transports share clips, adds the seeded noise and accounts; bit for bit."""
    records = _same_as_simulator(tiny_llama, "ffa", (2, 2, 2), tmp_path, monkeypatch,
                                 extra=["privacy.mode=client", "privacy.noise_multiplier=0.5", "privacy.clip=0.5"])
    eps = [r["privacy"]["epsilon"] for r in records[1:]]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]


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


def test_flower_strategy_records_round_0_only_while_metrics_hold_no_line():
    """Round 0 is skipped by the lines a resumed run holds, as ``Simulation.run`` skips it, not by the round it resumes
    after: a ServerApp restarted from round 0's checkpoint (start_round 0, one line) must not record round 0 again."""
    zeros = []
    server = SimpleNamespace(exp=SimpleNamespace(cfg=load_config(packaged_config("tiny"), [])),
                             round_zero=lambda: zeros.append(1) or {"round": 0})
    for start, lines, recorded in [(0, 0, [{"round": 0}]), (0, 1, []), (2, 3, [])]:  # a new run; resumed after round 0; after round 2
        got, zeros[:] = [], []
        strategy = FedLoraStrategy(server, None, "", got.append, start_round=start, lines=lines)
        assert strategy.evaluate(0, ArrayRecord()) is None
        assert got == recorded and len(zeros) == len(recorded) and strategy.lines == lines + len(recorded), (start, lines)
    for start, lines in [(0, 2), (1, 0), (2, 2), (-1, 0)]:  # not one line per round 0..start_round
        with pytest.raises(ValueError, match="start_round"):
            FedLoraStrategy(server, None, "", got.append, start_round=start, lines=lines)


def _timeless(entry):
    """A metrics line less what no rerun repeats: wall times, memory, the clients' own timings."""
    out = {k: v for k, v in entry.items() if k not in ("wall_s", "rss_mb")}
    out["clients"] = [{k: v for k, v in c.items() if k != "timing"} for c in entry.get("clients", [])]
    return out


def test_flower_resumed_from_round_0_and_stopped_again_resumes_and_ends_as_the_uninterrupted_run(tiny_llama, tmp_path, monkeypatch):
    """A ServerApp stopped in round 1 (only round 0's checkpoint), resumed, stopped again in round 3 and resumed once
    more writes each round's line once, checkpoints that count their lines right, and the uninterrupted run's lines
    and G_t − W_0, bit for bit. The old skip (``start_round > 0``) recorded round 0 twice, and the second resume
    refused the run ("metrics.jsonl holds rounds [0, 0, 1, 2]")."""
    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.rounds=3"])
    whole, whole_deltas, _ = _flower(exp, setup, tmp_path / "whole", monkeypatch)
    assert [r["round"] for r in whole] == [0, 1, 2, 3]
    exp.host.reset_base()  # the shared model back to W_0 before each new ServerApp's experiment (it reads W_0 off the model)

    run, lines = tmp_path / "run", []
    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.rounds=3"])
    with pytest.raises(RoundFailed):
        _flower(exp, setup, run, monkeypatch, fail_in=1, records=lines)
    exp.host.reset_base()
    assert [r["round"] for r in lines] == [0] and [p.name for p in checkpoint.complete(run / "checkpoints")] == ["round-0000"]

    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.rounds=3"])
    with pytest.raises(RoundFailed):
        _flower(exp, setup, run, monkeypatch, resume_from=run / "checkpoints" / "round-0000", recorded=list(lines), fail_in=3, records=lines)
    exp.host.reset_base()
    assert [r["round"] for r in lines] == [0, 1, 2]
    for path in checkpoint.complete(run / "checkpoints"):  # round-0001 and round-0002: one line per round 0..t
        meta = json.loads((path / "state.json").read_text())
        assert meta["metrics_lines"] == meta["round"] + 1, path.name

    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.rounds=3"])
    _, deltas, _ = _flower(exp, setup, run, monkeypatch, resume_from=run / "checkpoints" / "round-0002", recorded=list(lines), records=lines)
    assert [r["round"] for r in lines] == [0, 1, 2, 3]
    assert [_timeless(r) for r in lines] == [_timeless(r) for r in whole]
    assert set(deltas[3]) == set(whole_deltas[3]) and all(torch.equal(deltas[3][n], whole_deltas[3][n]) for n in deltas[3])


def test_flower_a_node_whose_base_is_damaged_drops_it_is_lost_once_and_is_reset_to_the_global_base(tiny_llama, tmp_path, monkeypatch):
    """A flipped byte in node 1's saved base after round 1: round 2 records it lost with the reason (never trains on
    a wrong base), and round 3 brings it from W_0 to the global base by a reset."""
    from fedlora.flower import state as node_state
    from fedlora.flower.state import load_state

    save = node_state.save_state

    def save_then_damage(folder, version, base):
        save(folder, version, base)
        if folder.name == "partition-1" and version == 1:  # after round 1's merge reached node 1 (its round-2 base)
            path = folder / f"base-v{version}.safetensors"
            data = bytearray(path.read_bytes())
            data[-8] ^= 0x40
            path.write_bytes(bytes(data))

    monkeypatch.setattr(node_state, "save_state", save_then_damage)
    exp, setup = _experiment(tiny_llama, "flora", (4, 2, 1), ["federation.rounds=4"])
    records, deltas, _ = _flower(exp, setup, tmp_path, monkeypatch)
    by_round = {r["round"]: r for r in records}
    lost = [(t, x) for t in range(1, 5) for x in by_round[t].get("lost", [])]
    assert len(lost) == 1 and lost[0][1]["id"] == 1 and "node state reset requested" in lost[0][1]["error"]
    after = lost[0][0] + 1
    assert 1 in [c["id"] for c in by_round[after]["clients"]]  # back the round after, from a reset
    version, base = load_state(state_dir(tmp_path / "node-1", "run", 1))
    assert version == after - 1
    want = deltas[after - 1]
    assert set(base) == set(want) and all(torch.allclose(base[n].double(), want[n], rtol=0, atol=1e-6) for n in want)
