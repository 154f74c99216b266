"""A real SuperLink and three SuperNodes (ranks 4, 2, 1) on 127.0.0.1, against the in-process simulator.

Every process is started by fedlora.flower.launch in its own process group and stopped by that
group's id in the fixtures' finalizers, also when a test fails. A test that signals a process Flower
started finds it among the descendants of its own SuperLink, never by name: another deployment may
run beside the suite.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from fedlora.flower.launch import FlowerRunError, LocalFederation
from tests.flower.conftest import FAST, LAYERS, QV, THREADS, TINY, as_in, assert_bit_for_bit, dense_file, read_metrics, rel_err_layers

pytestmark = pytest.mark.slow

SIM_KEYS = {"round", "method", "clients", "weights", "agg_noise", "init_noise", "bytes_up", "bytes_down", "local_rank_sum", "eval", "wall_s"}
ROW_KEYS = {"id", "rank", "num_examples", "train_loss", "bytes_up", "bytes_down", "init_noise", "padded_fraction", "local_rank_sum"}


@pytest.fixture(scope="module")
def loopback(tmp_path_factory, embedded_model):
    """One insecure federation for the module's runs (each run gets its own run id and node state)."""
    fed = LocalFederation(tmp_path_factory.mktemp("loopback"), 3, threads_per_node=THREADS, server_threads=THREADS)
    try:
        yield fed.start()
    finally:
        fed.stop()


def _recorded(run: Path, rnd: int) -> bool:
    try:
        return any(m["round"] == rnd for m in read_metrics(run))
    except (FileNotFoundError, ValueError):  # not written yet, or a line being written
        return False


def table_up(method: str, rank: int, nbytes: int = 4) -> int:
    """methods.md §1, uplink per client: r_k (d_in + d_out) per layer (+ r_k int64 indices for fedplora)."""
    return nbytes * rank * LAYERS * QV + (8 * rank if method == "fedplora" else 0)


def table_down(method: str, rnd: int, rank: int, ranks: list[int], nbytes: int = 4) -> int:
    """Downlink per client: flora sends the previous round's stack (Σ r_k), fedplora all R = max r_k modules."""
    if method == "flora":
        return 0 if rnd == 1 else nbytes * sum(ranks) * LAYERS * QV
    return nbytes * max(ranks) * LAYERS * QV + 8 * rank


def assert_matches_simulator(run: Path, sim: dict, rounds: list[int]) -> None:
    """Same clients, counters and diagnostics per round; G_t − W_0 and the losses within float tolerance."""
    flower = {m["round"]: m for m in read_metrics(run)}
    for rnd in [0, *rounds]:
        f, s = flower[rnd], sim["metrics"][rnd]
        assert set(s) <= set(f), f"round {rnd}: keys missing on Flower: {set(s) - set(f)}"
        assert f["eval"]["global"]["loss"] == pytest.approx(s["eval"]["global"]["loss"], abs=1e-6)
        for k, c in s["eval"]["clients"].items():
            assert f["eval"]["clients"][k]["loss"] == pytest.approx(c["loss"], abs=1e-6)
        if rnd == 0:
            continue
        assert (f["bytes_up"], f["bytes_down"], f["local_rank_sum"]) == (s["bytes_up"], s["bytes_down"], s["local_rank_sum"])
        assert f["weights"] == pytest.approx(s["weights"], abs=1e-12) and f["lost"] == []
        for fc, sc in zip(f["clients"], s["clients"], strict=True):
            assert ROW_KEYS <= set(fc)
            assert {k: fc[k] for k in ("id", "rank", "num_examples", "bytes_up", "bytes_down")} == {k: sc[k] for k in ("id", "rank", "num_examples", "bytes_up", "bytes_down")}
            assert fc["train_loss"] == pytest.approx(sc["train_loss"], abs=1e-6)
        assert f["init_noise"] == pytest.approx(s["init_noise"], abs=1e-6)
        assert f["agg_noise"] == pytest.approx(s["agg_noise"], rel=1e-2, abs=1e-6)
        got = dense_file(run / "checkpoints" / f"round-{rnd}-delta.safetensors")
        err = rel_err_layers(got, sim["deltas"][rnd])
        print(f"round {rnd}: ‖G_Flower − G_sim‖/‖G_sim‖ = {err:.2e}")
        assert err < 1e-6, f"round {rnd}: G_t − W_0 differs from the simulator's by {err:.2e}"


@pytest.mark.parametrize("method", ["flora"])  # fedplora's wire (indices, folds) is checked bit for bit in test_flower_inprocess.py
def test_flower_deploy_over_tls_with_node_authentication_matches_the_simulator_and_the_byte_table(federation, simulate, tmp_path, method):
    """(a, b) SmolLM2 over TLS (a CA and a server certificate for 127.0.0.1, generated here), with SuperNode
    authentication: registered keys connect, an unregistered key is refused; the run equals the simulator's."""
    from fedlora.flower.certs import make_node_key

    fed = federation(auth=True)
    private, _ = make_node_key(tmp_path / "keys", "intruder")  # never registered
    fed.start_node(0, ["--auth-supernode-private-key", str(private), "--max-retries", "0"], name="intruder", wait=False)
    overrides = [*FAST, f"federation.method={method}"]
    t0 = time.perf_counter()
    summary = fed.run(TINY, tmp_path / "run", overrides, checkpoint_deltas=True, round_timeout=900)
    flower_s = time.perf_counter() - t0
    sim = simulate(overrides)
    assert_matches_simulator(tmp_path / "run", sim, rounds=[1, 2])
    assert_bit_for_bit(tmp_path / "run", sim)  # one torch thread everywhere: not only close, the same numbers
    assert 'root-certificates = "' in (fed.cli_home / "config.toml").read_text()
    assert "https://127.0.0.1" in (fed.logs / "superlink.log").read_text()
    assert "Failed to activate SuperNode" in (fed.logs / "intruder.log").read_text()
    online = _online_nodes(fed)
    assert len(online) == 3 and {c["node"] for c in read_metrics(tmp_path / "run")[1]["clients"]} == set(online)

    # (d) what crossed the wire, against methods.md §1's table (float32)
    ranks = [4, 2, 1]
    for m in read_metrics(tmp_path / "run")[1:]:
        for c in m["clients"]:
            assert c["bytes_up"] == table_up(method, c["rank"]) and c["bytes_down"] == table_down(method, m["round"], c["rank"], ranks)
            assert 1.0 <= c["wire_bytes_up"] / table_up(method, c["rank"]) < 1.03  # + the key names
            down = table_down(method, m["round"], c["rank"], ranks)
            assert c["wire_bytes_down"] == 0 if down == 0 else 1.0 <= c["wire_bytes_down"] / down < 1.03

    # the run folder of `fedlora run`, and a final adapter equal to G_2 − W_0
    run = tmp_path / "run"
    assert {"config.yaml", "partition.json", "metrics.jsonl", "summary.json", "final"} <= {p.name for p in run.iterdir()}
    assert summary["transport"] == "flower" and summary["rounds"] == 2 and summary["lost"] == []
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    final = {}
    for key, A in adapter.items():
        if key.endswith("lora_A.weight"):
            layer = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            final[layer] = adapter[key.replace("lora_A", "lora_B")].double() @ A.double()  # lora_alpha = r: scale 1
    assert rel_err_layers(final, sim["deltas"][2]) < 1e-5  # export compresses in float64, stores float32
    print(f"\n{method}: Flower run {flower_s:.0f} s, wall per round {[round(m['wall_s']) for m in read_metrics(run)]}, "
          f"client timings {[c['timing'] for c in read_metrics(run)[1]['clients']]}")


def _online_nodes(fed: LocalFederation) -> list[int]:
    out = fed.flwr("supernode", "ls", "fedlora-local", "--format", "json").stdout
    return [int(n["node-id"]) for n in json.loads(out[out.index("{"):])["nodes"] if n.get("status") == "online"]


def test_flower_deploy_survives_a_killed_supernode_with_node_ranks_own_data_and_bfloat16(federation, tiny_model, tmp_path):
    """(c) SuperNode 2 dies (SIGKILL to its process group) while it trains in round 1: round 1 ends with
    the other two once the SuperLink misses its heartbeats, round 2 runs without it, the run finishes.
    On the way: node 0 trains on its own data file, node 1 declares rank 3 (the config says 2), and
    the factors travel as bfloat16. On a tiny random Llama (hidden 32, 2 blocks): the claim is about nodes, not the model."""
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}."}) + "\n" for i in range(30)))
    fed = federation(node_config={0: {"data-path": str(own)}, 1: {"rank": 3}})
    run = tmp_path / "run"
    overrides = [*FAST, "federation.method=flora", "federation.min_clients=2", "federation.wire_dtype=bfloat16", f"model.path={tiny_model}"]
    handle = fed.submit(TINY, run, overrides, round_timeout=300)
    node_log, deadline = fed.logs / "node-2.log", time.monotonic() + 600
    while "Receiving: train message" not in (node_log.read_text() if node_log.exists() else ""):
        assert handle.running() and time.monotonic() < deadline, "the run ended before node 2 got its round-1 plan"
        time.sleep(0.2)
    fed.kill_node(2)
    t_kill = time.perf_counter()
    summary = handle.wait(900)

    metrics = read_metrics(run)
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert [(c["id"], c["rank"], c["node_rank"]) for c in m["clients"]] == [(0, 4, 4), (1, 3, 3)] and [x["id"] for x in m["lost"]] == [2]
        assert m["clients"][0]["num_examples"] == 24  # node 0: all 30 of its own examples, less the 20 % test split
        assert len(m["weights"]) == 2 and sum(m["weights"]) == pytest.approx(1.0)
    assert "Node Unavailable" in metrics[1]["lost"][0]["error"] and metrics[1]["lost"][0]["node"] is not None
    assert metrics[2]["lost"][0] == {"id": 2, "node": None, "error": "no connected SuperNode holds this partition"}
    assert [(x["round"], x["id"]) for x in summary["lost"]] == [(1, 2), (2, 2)]
    assert (run / "final" / "adapter_model.safetensors").is_file() and summary["rounds"] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["ranks"] == [4, 3, 1]  # the ranks the nodes declared

    # (d) bfloat16 on the wire: the float32 counters stay the table, the wire carries half of it, plus the key names
    layers = [f"model.layers.{i}.self_attn.{t}_proj" for i in range(2) for t in "qv"]
    per_rank = 2 * ((32 + 32) + (32 + 16))  # Σ over the layers of d_in + d_out: q_proj 32 → 32, v_proj 32 → 16
    keys = sum(len(f"factors/{n}/{w}") for n in layers for w in "BA")
    for m in metrics[1:]:
        for c in m["clients"]:
            assert c["bytes_up"] == 4 * c["rank"] * per_rank
            assert c["wire_bytes_up"] == 2 * c["rank"] * per_rank + keys, (c["wire_bytes_up"], 2 * c["rank"] * per_rank + keys)
    for c in metrics[2]["clients"]:  # the round-1 merge of the two clients that trained, at its rank: at most 4 + 3
        # (one Adam step from B = 0 can leave a B's columns equal up to sign: the sum's SVD drops what adds nothing)
        assert 4 * 5 * per_rank <= c["bytes_down"] <= 4 * 7 * per_rank and c["bytes_down"] % (4 * 16) == 0, c["bytes_down"]
        assert c["bytes_down"] / 2 < c["wire_bytes_down"] < c["bytes_down"] / 2 + 4 * keys, c["wire_bytes_down"]
    print(f"\nkill → round 1 took {metrics[1]['wall_s']:.0f} s; run done {time.perf_counter() - t_kill:.0f} s after the kill; "
          f"bf16 uplink wire/table {[round(c['wire_bytes_up'] / c['bytes_up'], 4) for c in metrics[1]['clients']]}, "
          f"downlink {[round(c['wire_bytes_down'] / c['bytes_down'], 4) for c in metrics[2]['clients']]}; lost {metrics[1]['lost']}")


def _serverapps(fed: LocalFederation) -> list[psutil.Process]:
    """The live ServerApps of ``fed`` alone: under its own SuperLink (which starts them through its SuperExec), never
    found by name across the machine, where another deployment's ServerApp may be running."""
    found = []
    for p in psutil.Process(fed.procs["superlink"].pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any("flwr-serverapp" in part for part in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:  # ended while we looked
            pass
    return found


def _kill_serverapp_after(fed: LocalFederation, run: Path, overrides: list[str], checkpoint: str, **run_config) -> None:
    """Deploy on ``run`` and SIGKILL the ServerApp once ``checkpoints/<checkpoint>`` is complete, in the next round."""
    handle = fed.submit(TINY, run, overrides, round_timeout=900, checkpoint_deltas=True, **run_config)
    deadline = time.monotonic() + 900
    while not (run / "checkpoints" / checkpoint / "state.json").is_file():
        assert handle.running() and time.monotonic() < deadline, f"the run ended before its checkpoint {checkpoint}"
        time.sleep(0.05)
    (app,) = _serverapps(fed)
    app.send_signal(signal.SIGKILL)
    with pytest.raises(FlowerRunError):
        handle.wait(300)
    assert not (run / "final").exists() and not (run / "summary.json").exists()


def _checkpoints(run: Path) -> dict[str, int]:
    """Each complete checkpoint of ``run`` and how many metrics.jsonl lines it says it covers."""
    return {p.name: json.loads((p / "state.json").read_text())["metrics_lines"] for p in sorted((run / "checkpoints").glob("round-*")) if p.is_dir()}


def test_flower_deploy_resumes_a_killed_serverapp_bit_for_bit(loopback, simulate, tiny_model, tmp_path):
    """The ServerApp is SIGKILLed in round 1, when only round 0's checkpoint exists; a new one started with ``resume``
    on the same run folder goes on from round 1 and is SIGKILLed in its turn after its round-1 checkpoint; a third
    resumes from there, on the same SuperNodes (their saved bases). Each round's line is written once, each checkpoint
    counts its lines, and the run ends as an uninterrupted one would: the in-process simulator's run bit for bit, which
    an uninterrupted Flower run equals (the tests above and tests/flower/test_ray_simulation.py). Before the fix the
    first resume wrote round 0's line again and the second refused the run. Three deployments on a tiny random Llama
    (the claim is about processes and state, not the model); the ServerApp is found under this test's own SuperLink."""
    overrides = [*FAST, "federation.method=flora", f"model.path={tiny_model}"]  # 2 rounds
    run = tmp_path / "run"
    _kill_serverapp_after(loopback, run, overrides, "round-0000")  # killed in round 1
    assert [m["round"] for m in read_metrics(run)] == [0] and _checkpoints(run) == {"round-0000": 1}, "not killed in round 1"

    _kill_serverapp_after(loopback, run, overrides, "round-0001", resume=True)  # resumed from round 0, killed in round 2
    assert [m["round"] for m in read_metrics(run)] == [0, 1], "round 0 recorded again, or not killed in round 2"
    assert _checkpoints(run) == {"round-0000": 1, "round-0001": 2}
    assert not (run / "checkpoints" / "round-2-delta.safetensors").exists()

    loopback.run(TINY, run, overrides, round_timeout=900, resume=True, checkpoint_deltas=True)  # resumed from round 1
    assert_bit_for_bit(run, simulate(overrides))  # every line once, equal to the simulator's; G_1 and G_2 exactly
    assert _checkpoints(run) == {"round-0001": 2, "round-0002": 3}
    assert (run / "final" / "adapter_model.safetensors").is_file() and json.loads((run / "summary.json").read_text())["rounds"] == 2


def test_flower_deploy_of_fedsa_keeps_every_b_on_its_node_and_matches_the_simulator(loopback, simulate, tiny_model, tmp_path):
    """FedSA-LoRA on real SuperNodes: only A crosses the wire (the byte counters and the wire bytes say so, to the
    byte), each node keeps its B in its state folder and evaluates its own model, and every metrics line equals the
    in-process simulator's; each node writes its own final adapter. On a tiny random Llama (hidden 32, 2 blocks)."""
    overrides = [*FAST, "federation.method=fedsa", "lora.ranks=[2,2,2]", f"model.path={tiny_model}"]
    run = tmp_path / "run"
    summary = loopback.run(TINY, run, overrides, round_timeout=900)
    sim = simulate(overrides)
    flower = {m["round"]: m for m in read_metrics(run)}
    layers = [f"model.layers.{i}.self_attn.{t}_proj" for i in range(2) for t in "qv"]
    a_bytes = 4 * 2 * len(layers) * 32  # r·d_in per layer (float32): q_proj 32 → 32, v_proj 32 → 16
    a_wire = a_bytes + sum(len(f"factors/{n}/A") for n in layers)  # Flower counts data and key names; B would add 768 B of data
    assert sorted(flower) == sorted(sim["metrics_by_round"]) == [0, 1, 2]
    for rnd, f in flower.items():
        s = sim["metrics_by_round"][rnd]
        assert as_in(f, s) == as_in(s, s), f"round {rnd}"  # every client's own loss, the counters, the weights: exactly
        assert f["eval"]["clients"].keys() == {"0", "1", "2"}
        if rnd == 0:
            continue
        assert f["lost"] == [] and f["agg_noise"] is None
        for fc in f["clients"]:
            assert fc["bytes_up"] == fc["bytes_down"] == a_bytes
            assert fc["wire_bytes_up"] == a_wire, (fc["wire_bytes_up"], a_wire)
            assert a_bytes <= fc["wire_bytes_down"] < a_bytes + 768, fc["wire_bytes_down"]
    losses = [c["loss"] for c in flower[2]["eval"]["clients"].values()]
    assert len(set(losses)) == 3  # three models, one per client
    from fedlora.flower.server_app import run_key
    from fedlora.flower.state import state_dir

    for k in range(3):  # the node's own state folder for this run: its B after round 2, and its final adapter
        folder = state_dir(loopback.workdir / f"node-{k}" / "state", run_key(run), k)
        assert (folder / "kept-r2.safetensors").is_file() and (folder / "final" / "adapter_model.safetensors").is_file(), folder
    assert not (run / "final").exists() and summary["rounds"] == 2


def test_flower_deploy_runs_an_outside_packages_method_that_keeps_state_on_its_nodes(loopback, simulate, tiny_model, tmp_path):
    """``mixed-personal`` from the installed example package (examples/fedlora-example-methods), named by its entry
    point: the ServerApp and every SuperNode resolve it by name, each node keeps its own factors in its state folder
    between rounds and starts from its own mix, and every metrics line equals the in-process simulator's."""
    overrides = [*FAST, "federation.method=mixed-personal", "lora.ranks=[2,2,2]", f"model.path={tiny_model}"]
    run = tmp_path / "run"
    summary = loopback.run(TINY, run, overrides, round_timeout=900)
    sim = simulate(overrides)
    flower = {m["round"]: m for m in read_metrics(run)}
    assert sorted(flower) == sorted(sim["metrics_by_round"]) == [0, 1, 2]
    for rnd, f in flower.items():
        s = sim["metrics_by_round"][rnd]
        assert as_in(f, s) == as_in(s, s), f"round {rnd}"
    assert len({c["loss"] for c in flower[2]["eval"]["clients"].values()}) == 3  # three models, one per node
    from fedlora.flower.server_app import run_key
    from fedlora.flower.state import state_dir

    for k in range(3):
        folder = state_dir(loopback.workdir / f"node-{k}" / "state", run_key(run), k)
        assert (folder / "kept-r2.safetensors").is_file(), folder
    assert summary["rounds"] == 2 and flower[0]["method"] == "mixed-personal"
