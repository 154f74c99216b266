"""Load a causal LM and its tokenizer from a local folder; pick device and dtype."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        from fedlora.config import ConfigError

        raise ConfigError(f"model.device: 'cuda', but this torch ({torch.__version__}) sees no CUDA device (accepted here: auto, cpu)")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (where supported), float32 on CPU."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}[requested]


def resolve_model_dir(path: str | None, task: str = "causal_lm") -> Path:
    """The user's local folder, or the embedded model of the task (SmolLM2, or MiniLM for classification)."""
    if path:
        return Path(path).expanduser()
    from fedlora.model.assets import embedded_encoder_dir, embedded_model_dir

    return embedded_encoder_dir() if task == "classification" else embedded_model_dir()


def portable_base_name(model_dir: Path) -> str:
    """A base model's name that means the same on another machine: the hub-style ``org/name`` its config.json
    records, else the folder's own name. A user's absolute path never goes into an adapter's config."""
    try:
        recorded = json.loads((Path(model_dir) / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError):
        recorded = ""
    if recorded.count("/") == 1 and not recorded.startswith((".", "~")) and not Path(recorded).exists():
        return recorded
    return Path(model_dir).resolve().name


def find_base(adapter: Path, base: str | Path | None = None) -> Path:
    """The local base folder of an adapter: ``base`` when given; else its ``base_model_name_or_path`` when that is a
    local folder; else the path hint fedlora wrote beside it (fedlora_export.json); else the embedded model of
    that name. A one-line error names ``--base`` when none is found."""
    from fedlora.evaluation.runs import RunFolderError

    if base is not None:
        if not (Path(base) / "config.json").is_file():
            raise RunFolderError(f"--base: {base} is no local model folder (accepted: a folder with config.json)")
        return Path(base)
    name = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    hints = [Path(name)]
    if (adapter / "fedlora_export.json").is_file():
        hints.append(Path(json.loads((adapter / "fedlora_export.json").read_text()).get("base_model") or ""))
    for hint in hints:
        if str(hint) and (hint / "config.json").is_file():
            return hint
    from fedlora.model.assets import EMBEDDED_NAME, embedded_model_dir

    if name == EMBEDDED_NAME:
        return embedded_model_dir()
    raise RunFolderError(f"{adapter}/adapter_config.json: its base {name!r} is no local model folder here and no hint beside it names one "
                         "(accepted: --base /local/model/folder)")


def load_causal_lm(model_dir: Path, device: torch.device, dtype: torch.dtype):
    """Model (eval mode, all weights frozen) and tokenizer with a pad token, from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True).to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_classifier(model_dir: Path, num_labels: int, device: torch.device, dtype: torch.dtype, seed: int):
    """Sequence classifier (new head drawn under ``seed``, all weights frozen) and its tokenizer.

    A sentence-transformers folder that says it pools by the mean (``1_Pooling/config.json``, as
    all-MiniLM-L6-v2 does) gets a ``MeanPoolClassifier``: its [CLS] pooler was never trained for
    the embeddings it is known for. Any other folder gets ``AutoModelForSequenceClassification``.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if pools_by_mean(model_dir):
            body = AutoModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
            model = MeanPoolClassifier(body, num_labels)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels, dtype=dtype, local_files_only=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def pools_by_mean(model_dir: Path) -> bool:
    """True when a sentence-transformers pooling config next to the weights says mean pooling."""
    config = Path(model_dir) / "1_Pooling" / "config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text(encoding="utf-8")).get("pooling_mode_mean_tokens"))


class MeanPoolClassifier(torch.nn.Module):
    """A linear head on the attention-masked mean of the encoder's last hidden states.

    The encoder sits under its own ``base_model_prefix`` (``bert``), so layer names match
    ``AutoModelForSequenceClassification``'s and a LoRA adapter trained here loads there too.
    """

    def __init__(self, encoder: torch.nn.Module, num_labels: int) -> None:
        super().__init__()
        self.prefix = encoder.base_model_prefix
        setattr(self, self.prefix, encoder)
        self.config = encoder.config
        hidden = encoder.config.hidden_size
        self.dropout = torch.nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.classifier = torch.nn.Linear(hidden, num_labels, dtype=encoder.dtype)
        std = getattr(encoder.config, "initializer_range", 0.02)
        torch.nn.init.normal_(self.classifier.weight, std=std)  # as BERT's own heads start
        torch.nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = getattr(self, self.prefix)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, L, h)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (b, h)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))


def head_modules(model: torch.nn.Module) -> list[str]:
    """The task head a classifier adds on top of the pretrained body (trained densely by every client)."""
    names = {n for n, _ in model.named_children()}
    return [n for n in ("classifier", "score") if n in names]


ALL_LINEAR = "all-linear"  # lora.target_modules: PEFT's shorthand for every Linear layer but the output head


def target_layer_shapes(model: torch.nn.Module, target_modules: list[str]) -> dict[str, tuple[int, int]]:
    """Every nn.Linear whose last name component is a target: name → (d_out, d_in).

    ``[all-linear]``: every nn.Linear, as PEFT resolves the shorthand, but the output head
    (``get_output_embeddings``, e.g. a tied ``lm_head``) and a classifier's task head (trained densely).
    """
    if ALL_LINEAR in target_modules:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        heads = tuple(f"{h}." for h in head_modules(model))
        return {
            name: (module.out_features, module.in_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not out and not f"{name}.".startswith(heads)
        }
    shapes = {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    }
    return shapes


def meta_layer_shapes(model_dir: Path, target_modules: list[str], task: str = "causal_lm") -> dict[str, tuple[int, int]]:
    """Layer shapes from config.json alone (meta device, no weights read): validates ranks fast."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        if task == "classification" and pools_by_mean(model_dir):
            model = MeanPoolClassifier(AutoModel.from_config(config), 2)
        else:
            model = auto.from_config(config)
    return target_layer_shapes(model, target_modules)
