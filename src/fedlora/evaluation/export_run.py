"""`fedlora export RUN_DIR --out DIR [--rank r] [--merged] [--client K]`.

The run's final/ adapter holds its global update ΔW = W_T − W_0 exactly. For the methods whose
update lives in merged base weights (``merges``: flora, zeropad, fedex, florist, …) that exact
rank grows with every round, so the export keeps the top r singular triplets of every layer
(model/export.py), r the smallest one rank with every layer's relative error ≤ 1% unless
``--rank`` says otherwise.
The other methods are exported exactly unless ``--rank`` asks for less. ``--merged`` writes
W_0 + ΔW (the exact ΔW unless ``--rank`` is given) as a full model folder with the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedlora.integrity import seal
from fedlora.evaluation.runs import RunFolderError, open_run
from fedlora.model.adapters import AdapterHost
from fedlora.report.card import write_card
from fedlora.model.export import exact_rank, load_adapter_delta, overall_error, save_adapter, save_merged, smallest_rank, spectra, truncate
from fedlora.model.loading import load_causal_lm, resolve_model_dir, target_layer_shapes

TOLERANCE = 0.01


@dataclass(frozen=True)
class Exported:
    """What was written, for the terminal and for fedlora_export.json next to the files."""

    run_dir: str
    out: str
    method: str
    kind: str  # "adapter" or "merged"
    rank: int | None  # adapter rank (None: merged exactly)
    exact_rank: int
    max_layer_error: float  # max over layers of ‖ΔW − B'A'‖_F / ‖ΔW‖_F
    overall_error: float  # the same over all layers together
    worst_layer: str | None
    base_model: str


def export_run(run_dir: str | Path, out: str | Path, rank: int | None = None, merged: bool = False, client: int | None = None) -> Exported:
    run = open_run(run_dir)
    cfg = run.cfg
    if cfg.model.task != "causal_lm":
        raise RunFolderError(
            f"model.task: {cfg.model.task!r} runs cannot be exported, final/ holds no trained classifier head (accepted: causal_lm runs)"
        )
    if rank is not None and rank < 1:
        raise RunFolderError(f"--rank: {rank} (accepted: an integer >= 1)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunFolderError(f"--out: {out} already holds files (accepted: a new or empty folder)")
    adapter = run.adapter_dir(client)
    base_dir = resolve_model_dir(cfg.model.path, cfg.model.task)
    if not (base_dir / "config.json").is_file():
        raise RunFolderError(f"model.path: the run's base model {base_dir} is gone (accepted: the folder the run was trained on)")

    model, tokenizer = load_causal_lm(base_dir, torch.device("cpu"), _stored_dtype(base_dir) if merged else torch.float32)
    host = AdapterHost(model, list(target_layer_shapes(model, cfg.lora.target_modules)))
    delta = load_adapter_delta(host, adapter)
    specs = spectra(delta)
    exact = exact_rank(specs)
    if rank is not None and rank > exact:
        raise RunFolderError(f"--rank: {rank} exceeds the update's exact rank {exact} (accepted: 1..{exact}, or no --rank)")
    if rank is None and not merged and merges(cfg.federation.method):
        rank = smallest_rank(specs, TOLERANCE)
    errors = {}
    if rank is not None:
        delta, errors = truncate(specs, rank)
    worst = max(errors, key=errors.get, default=None)
    out.mkdir(parents=True, exist_ok=True)
    if merged:
        save_merged(host, delta, tokenizer, out)
    else:
        written = save_adapter(host, delta, cfg.lora.target_modules, out, str(base_dir))
        rank = written if rank is None else rank
    result = Exported(
        str(run.path), str(out), cfg.federation.method, "merged" if merged else "adapter", rank, exact,
        errors[worst] if worst else 0.0, overall_error(specs, rank) if errors else 0.0, worst, str(base_dir),
    )
    (out / "fedlora_export.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    write_card(out, run.path, cfg, str(base_dir), client, note=f"Exported by `fedlora export`: {describe(result)}.", merged=merged)
    seal(out)  # SHA256SUMS: whoever loads it later can tell a damaged copy
    return result


def describe(e: Exported) -> str:
    """One line for the terminal."""
    what = "full model (W_0 + ΔW)" if e.kind == "merged" else f"PEFT adapter, rank {e.rank}"
    if e.rank is None or e.rank >= e.exact_rank:
        err = "exact"
    else:
        err = (
            f"rank {e.rank} of {e.exact_rank}: relative error ‖ΔW − B'A'‖_F/‖ΔW‖_F {100 * e.max_layer_error:.3f}% "
            f"in the worst layer ({e.worst_layer}), {100 * e.overall_error:.3f}% over all layers"
        )
    return f"{e.method}: {what} in {e.out} ({err}); base model {e.base_model}"


def merges(method: str) -> bool:
    """Whether the run's method merges into the base each round (its declared ``merges``): ΔW's rank grows with the rounds."""
    from fedlora.methods import method_class

    return method_class(method).merges


def _stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the base model's weights are stored in (float32 when config.json does not say)."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, str(name), torch.float32)
