"""A user's Dolly-format JSONL file, fine-tuned on end to end through `fedlora run` on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.cli import main

ROOT = Path(__file__).resolve().parents[2]

# three Dolly categories, one per client under the natural partition; short, regular answers a few steps can learn
TOPICS = {
    "open_qa": ("What colour is the {}?", "", "The {} is blue."),
    "classification": ("Is a {} an animal or a tool?", "", "A {} is a tool."),
    "summarization": ("Summarise the note in one line.", "The {} arrived on time and worked well.", "The {} was fine."),
}
THINGS = ["hammer", "kettle", "ladder", "stapler", "shovel", "wrench", "bucket", "needle", "anvil", "chisel", "rake", "spoon"]


def write_dolly(path: Path) -> Path:
    rows = [
        {"instruction": q.format(t), "context": c.format(t), "response": a.format(t), "category": name}
        for name, (q, c, a) in TOPICS.items()
        for t in THINGS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
def test_dolly_jsonl_runs_end_to_end_partitioned_by_category(tmp_path: Path) -> None:
    data = write_dolly(tmp_path / "dolly.jsonl")
    run = tmp_path / "run"
    code = main([
        "run", str(ROOT / "configs" / "tiny.yaml"), f"data.source={data}", "data.partition=natural", "data.by=category",
        "data.max_examples=null", "federation.rounds=1", "train.local_steps=2", "train.batch_size=2", "train.micro_batch_size=2",
        "train.lr=0.003", "train.max_length=64", "eval.max_examples=6", f"output.dir={run}",
    ])
    assert code == 0
    assert {"config.yaml", "partition.json", "metrics.jsonl", "summary.json", "final"} <= {p.name for p in run.iterdir()}

    part = json.loads((run / "partition.json").read_text())
    assert part["source"] == str(data) and part["partition"] == "natural" and part["num_examples"] == 36
    held = [list(c["categories"]) for c in part["clients"]]
    assert sorted(h[0] for h in held) == sorted(TOPICS) and all(len(h) == 1 for h in held)  # one category per client

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [0, 1]
    before, after = lines[0]["eval"]["global"]["loss"], lines[1]["eval"]["global"]["loss"]
    assert after < before
