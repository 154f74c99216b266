"""A checkpoint restores the whole simulation: the rounds after it come out bit-identical (tiny Llama, in process)."""

from __future__ import annotations

import json
import shutil

import pytest

from fedlora.app import checkpoint
from fedlora.sim.federation import Simulation
from tests.sim.test_simulation import _experiment


def _entries(records):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "rss_mb")} for r in records]


@pytest.mark.parametrize("name, ranks", [("hetlora", (4, 2, 1)), ("flora", (4, 2, 1)), ("fedsa", (2, 2, 2)), ("fedex", (2, 2, 2))])
def test_rounds_after_a_checkpoint_equal_the_uninterrupted_run(tiny_llama, tmp_path, name, ranks):
    """HETLoRA: the richest state (global pair, learnt per-client ranks, last weights); FLoRA: the merged base,
    rebuilt on the model from the method's state; FedSA-LoRA: what every client keeps (its B), which
    the checkpoint holds for the in-process clients; FedEx-LoRA: a merged base beside a live adapter.
    The other methods' state round trip is in
    tests/methods/test_properties.py, resume after SIGKILL in tests/e2e/test_resume.py."""
    whole, saved = [], {}
    sim = Simulation(_experiment(tiny_llama, name, ranks))
    sim.run(whole.append, checkpoint=lambda entry, lines: saved.setdefault(entry["round"], checkpoint.save(tmp_path / "ck", sim.server, entry["round"], lines, entry)))
    final = {n: [[x.clone() for x in t.tensors()] for t in ts] for n, ts in sim.exp.method.global_delta().items()}
    weights = {n: p.clone() for n, p in sim.exp.host.model.state_dict().items()}
    assert [p.name for p in checkpoint.complete(tmp_path / "ck")] == ["round-0001", "round-0002"]  # the last two

    sim.exp.host.reset_base()  # the fixture's model back to W_0 for the second experiment
    resumed = Simulation(_experiment(tiny_llama, name, ranks))
    done = checkpoint.load(saved[1], resumed.server, whole)
    assert _entries(done) == json.loads(json.dumps(_entries(whole[:2])))
    rest: list = []
    resumed.run(rest.append, done=done)
    assert _entries(rest) == _entries(whole[2:])
    again = resumed.exp.method.global_delta()
    assert final.keys() == again.keys()
    for n, terms in final.items():
        assert all(all(x.equal(y) for x, y in zip(xs, t.tensors(), strict=True)) for xs, t in zip(terms, again[n], strict=True))
    assert all(p.equal(weights[n]) for n, p in resumed.exp.host.model.state_dict().items())  # the model's base too
    assert sim.server.kept.keys() == resumed.server.kept.keys() and (not sim.exp.method.keeps or sim.server.kept)
    for k, own in sim.server.kept.items():  # what each client keeps (FedSA-LoRA's B), bit for bit
        assert own.keys() == resumed.server.kept[k].keys() and all(own[n].equal(resumed.server.kept[k][n]) for n in own)


def _truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _flip_last_byte(p):  # inside the tensor data: only the checksum can tell
    b = bytearray(p.read_bytes())
    b[-3] ^= 0x40
    p.write_bytes(bytes(b))


def _zero_header(p):
    b = bytearray(p.read_bytes())
    b[:8] = bytes(8)
    p.write_bytes(bytes(b))


def _change_a_digit(p):
    """A digit of the skeleton changed: still valid JSON, so only the checksum of state.json itself can tell."""
    text = p.read_text()
    i = text.index('"metrics_lines": ') + len('"metrics_lines": ')
    p.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


DAMAGE = {
    "json digit changed, still JSON": ("state.json", _change_a_digit),
    "tensors truncated": ("state.safetensors", _truncate),
    "a tensor byte flipped": ("state.safetensors", _flip_last_byte),
    "header zeroed": ("state.safetensors", _zero_header),
    "tensors missing": ("state.safetensors", lambda p: p.unlink()),
    "json truncated": ("state.json", _truncate),
    "json empty": ("state.json", lambda p: p.write_text("")),
}


def _run_folder(tiny_llama, tmp_path):
    from fedlora.app.run_dir import RunDir

    exp = _experiment(tiny_llama, "flora", (4, 2, 1))
    run = RunDir(tmp_path / "run")
    run.write_config(exp.cfg)
    checkpoint.run_with_checkpoints(Simulation(exp), run)
    exp.host.reset_base()
    return run, exp.cfg


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumes(tiny_llama, tmp_path, kind, caplog):
    from fedlora.app.run_dir import RunDir

    run, _ = _run_folder(tiny_llama, tmp_path)
    whole = run.read_metrics()
    name, hurt = DAMAGE[kind]
    assert checkpoint.damage(run.checkpoints / "round-0002") is None
    hurt(run.checkpoints / "round-0002" / name)
    assert checkpoint.damage(run.checkpoints / "round-0002") is not None
    resumed = Simulation(_experiment(tiny_llama, "flora", (4, 2, 1)))
    again = RunDir(run.path, resume=True)
    with caplog.at_level("WARNING"):
        checkpoint.run_with_checkpoints(resumed, again, resume_run=True)
    assert "round-0002 is damaged" in caplog.text
    assert _entries(again.read_metrics()) == _entries(whole)  # round 2 redone from round 1's checkpoint, bit for bit
    assert checkpoint.damage(run.checkpoints / "round-0002") is None  # rewritten intact


def test_with_no_intact_checkpoint_resume_stops_in_one_line_and_changes_nothing(tiny_llama, tmp_path):
    from fedlora.app.run_dir import RunDir

    run, _ = _run_folder(tiny_llama, tmp_path)
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    for ck in checkpoint.complete(run.checkpoints):
        _flip_last_byte(ck / "state.safetensors")
    damaged = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    with pytest.raises(checkpoint.CheckpointError, match=r"^--resume: no intact checkpoint in .*\(2 damaged\); nothing was changed$"):
        checkpoint.resume(RunDir(run.path, resume=True), Simulation(_experiment(tiny_llama, "flora", (4, 2, 1))).server)
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == damaged
    shutil.rmtree(run.checkpoints)  # no checkpoints at all, but rounds recorded: refuse, keep metrics.jsonl
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint, but metrics.jsonl records 3 rounds"):
        checkpoint.resume(RunDir(run.path, resume=True), Simulation(_experiment(tiny_llama, "flora", (4, 2, 1))).server)
    assert run.metrics.read_bytes() == before[run.metrics]


def test_a_checkpoint_of_another_method_or_without_its_metrics_is_one_line(tiny_llama, tmp_path):
    run, _ = _run_folder(tiny_llama, tmp_path)
    newest = checkpoint.complete(run.checkpoints)[-1]
    other = Simulation(_experiment(tiny_llama, "fedit", (2, 2, 2))).server
    with pytest.raises(checkpoint.CheckpointError, match=r"^--resume: .* is a checkpoint of method 'flora', not 'fedit'"):
        checkpoint.load(newest, other, run.read_metrics())
    same = Simulation(_experiment(tiny_llama, "flora", (4, 2, 1))).server
    with pytest.raises(checkpoint.CheckpointError, match=r"^--resume: metrics.jsonl holds rounds \[0\], the checkpoint round-0002 needs rounds 0..2"):
        checkpoint.load(newest, same, run.read_metrics()[:1])


def test_a_checkpoint_of_the_previous_format_is_named_as_older_not_as_damaged(tmp_path):
    import json

    folder = tmp_path / "round-0001"
    folder.mkdir()
    (folder / "state.safetensors").write_bytes(b"x")
    (folder / "state.json").write_text(json.dumps({"format": 2, "sha256": checkpoint.sha256(folder / "state.safetensors")}))
    assert checkpoint.damage(folder) == "written by an older fedlora (checkpoint format 2, without its own checksum): resume it with that version"
    (folder / "state.json").write_text(json.dumps({"format": 9}))
    assert checkpoint.damage(folder) == f"state.json is not a format-{checkpoint.FORMAT} checkpoint with its checksums"
