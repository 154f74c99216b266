"""The model `fedlora eval` scores: a run's global model, a PEFT adapter on its base, or a full folder.

- RUN_DIR: the base of its config plus final/ (or final/client-K/), folded into the target
  weights exactly as the run evaluated it (AdapterHost.set_delta);
- an adapter folder (adapter_config.json): its base (``--base``, else found by ``find_base`` from
  the portable name and the path hint beside it) with the adapter merged in;
- a model folder (config.json): loaded as it is, e.g. `fedlora export --merged`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.evaluation.runs import RunFolderError, is_run_dir, open_run
from fedlora.model.adapters import AdapterHost
from fedlora.model.export import load_adapter_delta
from fedlora.model.loading import find_base, load_causal_lm, pick_device, pick_dtype, resolve_model_dir, target_layer_shapes


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    what: str  # one line: which model this is
    max_length: int = 256
    train_on_inputs: bool = False
    max_length_from: str = "the default"  # or the run's own train.max_length: the scored tokens depend on it


def load_for_eval(path: str | Path, client: int | None = None, device: str = "auto", base: str | Path | None = None) -> EvalModel:
    path = Path(path)
    if base is not None and not (path / "adapter_config.json").is_file():
        raise RunFolderError(f"--base: {path} is not an adapter folder (accepted: --base with an exported adapter)")
    dev = pick_device(device)
    if is_run_dir(path):
        return _from_run(path, client, dev)
    if client is not None:
        raise RunFolderError(f"--client: {path} is not a run folder (accepted: --client with a RUN_DIR of a local run)")
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = find_base(path, base)
        model, tokenizer = load_causal_lm(base, dev, pick_dtype("auto", dev))
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
        return EvalModel(model, tokenizer, dev, f"adapter {path} on {base}")
    if (path / "config.json").is_file():
        model, tokenizer = load_causal_lm(path, dev, pick_dtype("auto", dev))
        return EvalModel(model, tokenizer, dev, f"model {path}")
    raise RunFolderError(f"RUN_DIR|MODEL_DIR: {path} is neither a run folder, an adapter nor a model folder (accepted: a folder from fedlora run or fedlora export)")


def _from_run(path: Path, client: int | None, dev: torch.device) -> EvalModel:
    run = open_run(path)
    cfg = run.cfg
    if cfg.model.task != "causal_lm":
        raise RunFolderError(f"model.task: {cfg.model.task!r} runs are scored by fedlora run itself, final/ holds no classifier head (accepted: causal_lm runs)")
    adapter = run.adapter_dir(client)
    model, tokenizer = load_causal_lm(resolve_model_dir(cfg.model.path), dev, pick_dtype(cfg.model.dtype, dev))
    host = AdapterHost(model, list(target_layer_shapes(model, cfg.lora.target_modules)))
    host.set_delta(load_adapter_delta(host, adapter))
    who = f"client {client}'s model" if client is not None else "global model"
    return EvalModel(host.model, tokenizer, dev, f"{cfg.federation.method} {who} of {path}", cfg.train.max_length, cfg.train.train_on_inputs,
                     "the run's train.max_length")
