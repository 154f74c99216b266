"""The README.md of an adapter fedlora writes: what trained it and how well, in place of PEFT's blank template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.config import Config
from fedlora.model.loading import portable_base_name


def adapter_card(cfg: Config, metrics: list[dict[str, Any]], base_model: str, run_name: str, client: int | None = None,
                 note: str = "", merged: bool = False) -> str:
    """Hub-style model card (YAML front matter for PEFT, then the run's method, data, schedule and held-out losses)."""
    from fedlora.app.run_dir import provenance

    f, d, t, lo = cfg.federation, cfg.data, cfg.train, cfg.lora
    ranks = cfg.client_ranks()
    first, last = metrics[0] if metrics else {}, metrics[-1] if metrics else {}
    partition = d.partition + (f" (α = {d.alpha})" if d.partition in ("dirichlet", "quantity") else "")
    prov = provenance()
    commit = f" (commit {prov['commit'][:12]})" if prov["commit"] else ""
    who = f"client {client}'s own model" if client is not None else "the global model"
    name = portable_base_name(Path(base_model))
    lines = [
        "---", f"base_model: {name}", "library_name: peft", f"tags: [fedlora, federated-learning, lora, {f.method}]", "---", "",
        f"# {run_name}: {who}, federated LoRA ({f.method})", "",
        f"Trained with fedlora {prov['fedlora_version'] or ''}{commit}: "
        f"method `{f.method}`, {f.num_clients} clients with LoRA ranks {ranks} on {', '.join(lo.target_modules)}, "
        f"{last.get('round', 0)} of {f.rounds} rounds, {f.fraction:.0%} of the clients per round, {t.local_steps} local AdamW steps "
        f"of {t.batch_size} examples at lr {t.lr:g}, max length {t.max_length}, seed {cfg.seed}.", "",
        f"Data: `{d.source}`, partition {partition} over `{d.by}`; {d.global_test_fraction:g} held out as the global test split, "
        f"{d.test_fraction:g} of each client's share as its own.", "",
    ]
    table = _losses(first, last, client)
    if table:
        lines += ["| held-out | before round 1 | after the last round |", "|---|---|---|", *table, ""]
    if merged:  # W_0 + ΔW as a whole model: no adapter to attach
        lines += ["A whole model (the base with the federated update merged in). Load it with transformers:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("<this folder>")', 'tokenizer = AutoTokenizer.from_pretrained("<this folder>")', "```", ""]
    else:
        lines += [
            "Load it with PEFT:", "", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{name}"), "<this folder>")', "```", "",
            f"`{name}` is the base's portable name; it was trained on the local copy `{base_model}`. Where the name does not "
            "resolve, pass your own copy's folder in its place (`fedlora eval <this folder> --base DIR`).", "",
        ]
    if note:
        lines += [note, ""]
    return "\n".join(lines)


def _losses(first: dict[str, Any], last: dict[str, Any], client: int | None) -> list[str]:
    rows = []
    for name, get in (("global test loss", lambda e: (e.get("eval") or {}).get("global", {}).get("loss")),
                      *([(f"client {client} test loss", lambda e: (e.get("eval") or {}).get("clients", {}).get(str(client), {}).get("loss"))]
                        if client is not None else [])):
        a, b = get(first), get(last)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            rows.append(f"| {name} | {a:.4f} | {b:.4f} |")
    return rows


def write_card(folder: Path, run_folder: Path, cfg: Config, base_model: str, client: int | None = None, note: str = "",
               merged: bool = False) -> None:
    """``folder/README.md`` from the first and last lines of the run's metrics.jsonl (what exists of it)."""
    card = adapter_card(cfg, first_and_last(run_folder / "metrics.jsonl"), base_model, run_folder.name, client, note, merged)
    (folder / "README.md").write_text(card)


def first_and_last(path: Path, tail: int = 1 << 16) -> list[dict[str, Any]]:
    """The first and the last metrics entries, read from the file's two ends: a card per client of a long run
    must not read every round's line once per client."""
    if not path.is_file() or path.stat().st_size == 0:
        return []
    with open(path, "rb") as f:
        first = f.readline()
        size = f.seek(0, 2)
        while True:  # widen the window until it holds a whole last line
            f.seek(max(0, size - tail))
            lines = f.read().splitlines()
            if len(lines) > 1 or tail >= size:
                break
            tail *= 4
    return [json.loads(first), json.loads(lines[-1])]
