"""One typed, validated config: a YAML file plus dotted ``key=value`` overrides.

Every field says what it is for; an unknown key, a wrong type or an impossible combination
fails before any work with one line that names the setting, the bad value and what is
accepted (style.md lesson 5).
"""

from __future__ import annotations

import math

import copy
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A bad setting: the message is one line naming the setting, the value and what is accepted."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(Section):
    path: str | None = Field(None, description="Local HF model folder; empty = the embedded SmolLM2-135M-Instruct.")
    task: Literal["causal_lm", "classification"] = Field("causal_lm", description="causal_lm (instruction tuning) or classification (encoder + head).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto = bfloat16 on CUDA, float32 on CPU.")


class LoraCfg(Section):
    ranks: list[int] | None = Field(None, description="One LoRA rank per client (heterogeneous).")
    rank: int | None = Field(None, description="One rank for all clients; overrides ranks.")
    scale: float | list[float] = Field(2.0, description="s = lora_alpha / r; a list gives each client its own s_k.")
    target_modules: list[str] = Field(["q_proj", "v_proj"], description="Linear layers that get LoRA (module-name suffixes), or all-linear: every Linear but the output head, as peft defines it.")
    rank_patterns: dict[str, int | list[int]] = Field(
        default_factory=dict, description="Per-layer ranks: module-name suffix (e.g. mlp.down_proj) → one rank, or one per client."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    adapter: Literal["lora", "adalora"] = Field("lora", description="Local adapter type; adalora prunes each client's rank while it trains (flora only).")
    adalora_target: float = Field(0.5, gt=0, le=1, description="AdaLoRA: average rank kept, as a fraction of r_k.")
    adalora_orth_reg: float = Field(0.5, ge=0, description="AdaLoRA: orthogonality regulariser weight.")

    @field_validator("ranks", "target_modules", "scale", mode="before")
    @classmethod
    def _comma_list(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str) and ("," in v or info.field_name == "target_modules"):  # one name alone too: all-linear
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("target_modules")
    @classmethod
    def _all_linear_alone(cls, v: list[str]) -> list[str]:
        if "all-linear" in v and len(v) > 1:
            raise ValueError(f"'all-linear' (every Linear layer but the output head) stands alone, got {v} (accepted: all-linear, or layer names)")
        return v

    @field_validator("scale")
    @classmethod
    def _positive_scale(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or any(not math.isfinite(x) or x <= 0 for x in values):
            raise ValueError(f"must be finite and greater than 0 (s = lora_alpha / r; 0 trains nothing), got {v}")
        return v

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"must be positive integers, got {v}")
        return v

    @field_validator("rank")
    @classmethod
    def _positive_rank(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a positive integer, got {v}")
        return v


class DataCfg(Section):
    source: str = Field(
        "chatterbot",
        description="Built in: chatterbot, news, rotten-tomatoes, healthtweets, fortunes; or a local .json/.jsonl/.csv/.parquet file or save_to_disk folder.",
    )
    language: str = Field("english", description="chatterbot language folder.")
    partition: Literal["iid", "dirichlet", "pathological", "natural", "quantity"] = Field("dirichlet", description="How examples are dealt to clients.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for dirichlet and quantity (smaller = more skewed).")
    by: str = Field("category", description="Column the partition follows: 'category' = the source's natural one (topic, outlet, label), or a column name.")
    min_size: int = Field(2, ge=1, description="Fewest examples any client may get.")
    classes_per_client: int = Field(2, ge=1, description="pathological: categories per client.")
    text_field: str | None = Field(None, description="Text column of a file with other names.")
    label_field: str | None = Field(None, description="Label column of a file with other names.")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Share of each client's data held out for its test split; it must leave every client a training example.")
    global_test_fraction: float = Field(0.1, ge=0, lt=1, description="Share of all data held out as the global test split.")
    max_examples: int | None = Field(None, ge=1, description="Seeded subset of the source (None = all).")
    global_test_seed: int | None = Field(
        None, ge=0, lt=2**63,
        description="Seed of the subset and the global test split (None = seed); fixed, runs of several seeds are scored on the same examples.",
    )


class FederationCfg(Section):
    method: str = Field("flora", description="Aggregation method (see `fedlora methods`).")
    rounds: int = Field(3, ge=1, le=1_000_000, description="Communication rounds.")
    num_clients: int = Field(10, ge=1, le=1_000_000, description="Number of clients.")
    fraction: float = Field(1.0, gt=0, le=1, description="Share of clients sampled each round.")
    min_clients: int = Field(1, ge=1, description="At least this many clients per round.")
    options: dict[str, Any] = Field(default_factory=dict, description="Method options, e.g. weights: uniform.")
    wrappers: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Wrappers at the aggregation seam of a sums_only method, in order: [{use: clip, max_norm: 0.5}] bounds each "
                    "client's contribution; use: package.module:Class for your own (federation/wrappers.py).",
    )
    wire_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of factors on the wire (Flower).")
    max_update_norm: float = Field(
        1e4, gt=0, allow_inf_nan=False,
        description="Largest accepted ‖B‖_F, ‖A‖_F and s·‖B‖_F·‖A‖_F of a client's update on any layer; a larger one is rejected.",
    )


class TrainCfg(Section):
    local_steps: int = Field(4, ge=1, le=10_000_000, description="Optimizer steps per client per round.")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step.")
    micro_batch_size: int = Field(8, ge=1, description="Examples per forward pass (gradient accumulation).")
    lr: float = Field(2e-4, gt=0, le=1.0, allow_inf_nan=False, description="AdamW learning rate, in (0, 1]: above 1 AdamW's steps overwhelm any LoRA.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the LoRA factors.")
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=False, description="Gradient clipping.")
    max_length: int = Field(256, ge=8, description="Tokens per example (longer ones are truncated); at most the model's context, checked when it loads.")
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (default: the response only).")
    precision: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Matrix multiplies of training and evaluation: float32, bfloat16 (autocast; float32 master weights), "
                               "float16 (autocast with loss scaling, for GPUs without bfloat16; steps an overflow skipped are each client's skipped_steps in metrics.jsonl), "
                               "or auto = bfloat16 where the hardware has it (CUDA with bf16, CPUs with AVX512-BF16 or AMX).")


class EvalCfg(Section):
    every: int = Field(1, ge=1, description="Evaluate every N rounds (and always after the last).")
    batch_size: int = Field(16, ge=1, description="Examples per evaluation forward pass.")
    max_examples: int | None = Field(64, ge=1, description="Cap on each test split (None = all).")
    client_splits: Literal["every", "ends"] = Field(
        "every", description="When the clients' own test splits are scored: at every evaluation, or only before round 1 and after the last (the global split is scored at every evaluation; long studies of many clients spend most of their time on client splits otherwise)."
    )

    def scores_clients(self, number: int, rounds: int) -> bool:
        """Whether the evaluation after round ``number`` (0: before training) scores every client's own test split."""
        return self.client_splits == "every" or number in (0, rounds)


class PrivacyCfg(Section):
    mode: Literal["none", "client"] = Field(
        "none", description="client: client-level DP on a trusted server: each client's contribution clipped to privacy.clip, "
                            "uniform weights, Gaussian noise on the sums, ε(δ) accounted every round (docs/privacy.md); sums_only methods.")
    clip: float = Field(1.0, gt=0, allow_inf_nan=False, description="C: the largest L2 norm of one client's contribution (all its tensors together).")
    noise_multiplier: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="σ: the noise's standard deviation over the sum's L2 sensitivity; null: calibrated from privacy.target_epsilon.")
    target_epsilon: float | None = Field(None, gt=0, allow_inf_nan=False, description="ε to reach after federation.rounds rounds; σ is calibrated before the run (and written into the run's config).")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the reported (ε, δ).")
    max_epsilon: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="The run stops before the round whose release would pass this ε (the run's config then holds the rounds it can afford).")


class OutputCfg(Section):
    dir: str | None = Field(None, description="Run folder; default runs/<timestamp>-<method>.")
    save_final: bool = Field(True, description="Write the final global weights/adapter under final/.")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that also get every round's metrics, offline in the run folder (pip install -e \".[trackers]\").",
    )


class Config(Section):
    seed: int = Field(0, ge=0, lt=2**63, description="Seeds data splits, sampling, init and batching (0 ≤ seed < 2^63: what torch and NumPy accept).")
    model: ModelCfg = Field(default_factory=ModelCfg)
    lora: LoraCfg = Field(default_factory=LoraCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    federation: FederationCfg = Field(default_factory=FederationCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    output: OutputCfg = Field(default_factory=OutputCfg)
    privacy: PrivacyCfg = Field(default_factory=PrivacyCfg)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        n = self.federation.num_clients
        if self.lora.rank is None and self.lora.ranks is None:
            raise ValueError("lora: set lora.ranks (one per client) or lora.rank (all clients)")
        if self.lora.rank is None and len(self.lora.ranks) != n:
            raise ValueError(f"lora.ranks: {len(self.lora.ranks)} ranks {self.lora.ranks} for federation.num_clients={n} (accepted: exactly {n} ranks, or lora.rank=R)")
        for key, r in self.lora.rank_patterns.items():
            rs = r if isinstance(r, list) else [r]
            if (isinstance(r, list) and len(r) != n) or min(rs) < 1:
                raise ValueError(f"lora.rank_patterns.{key}: {r} (accepted: one positive rank, or exactly {n} of them)")
        if isinstance(self.lora.scale, list) and len(self.lora.scale) != n:
            raise ValueError(f"lora.scale: {len(self.lora.scale)} scales for federation.num_clients={n} (accepted: one number, or exactly {n})")
        if self.federation.min_clients > n:
            raise ValueError(f"federation.min_clients: {self.federation.min_clients} > federation.num_clients={n}")
        if self.lora.adapter == "adalora" and self.federation.method != "flora":
            raise ValueError(f"lora.adapter: 'adalora' works with federation.method=flora only, got {self.federation.method!r} (accepted: lora)")
        if self.lora.adapter == "adalora" and (self.train.local_steps < 2 or self.lora.rank_patterns):
            raise ValueError("lora.adapter: 'adalora' needs train.local_steps >= 2 (a budgeting phase) and no lora.rank_patterns")
        if self.privacy.mode == "client" and self.privacy.noise_multiplier is None and self.privacy.target_epsilon is None:
            raise ValueError("privacy.mode: 'client' needs privacy.noise_multiplier or privacy.target_epsilon (accepted: e.g. privacy.target_epsilon=3)")
        if self.train.micro_batch_size > self.train.batch_size:
            raise ValueError(f"train.micro_batch_size: {self.train.micro_batch_size} > train.batch_size={self.train.batch_size}")
        return self

    def client_ranks(self) -> list[int]:
        n = self.federation.num_clients
        return [self.lora.rank] * n if self.lora.rank is not None else list(self.lora.ranks)

    def client_rank_patterns(self) -> dict[str, dict[int, int]]:
        n = self.federation.num_clients
        return {k: dict(enumerate(r if isinstance(r, list) else [r] * n)) for k, r in self.lora.rank_patterns.items()}

    def client_scales(self) -> list[float]:
        s = self.lora.scale
        return [float(x) for x in s] if isinstance(s, list) else [float(s)] * self.federation.num_clients


def packaged_config(name: str) -> Path:
    """A config shipped inside the package (`default`, `tiny`)."""
    return Path(str(files("fedlora") / "configs" / f"{name}.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (default: the packaged default.yaml) + ``key=value`` overrides → validated Config."""
    path = Path(path) if path else packaged_config("default")
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path} (accepted: a YAML file, or no argument for the default)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path} is not UTF-8 text (accepted: a YAML file)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections, got {type(raw).__name__}")
    return build_config(raw, overrides or [])


def build_config(raw: dict[str, Any], overrides: list[str]) -> Config:
    data = copy.deepcopy(raw)
    for item in overrides:
        apply_override(data, item)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
    if cfg.privacy.mode == "client":
        from fedlora.federation.privacy import planned

        cfg = planned(cfg)  # σ calibrated and rounds capped by the budget, written into the config the run keeps
    return cfg


def apply_override(data: dict[str, Any], item: str) -> None:
    """``a.b.c=value``: the value is parsed as YAML (numbers, lists, null); lora.rank and lora.ranks replace each other."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override: {item!r} is not key=value (accepted: e.g. federation.rounds=5)")
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override: {key} — {p!r} is not a section")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node[parts[-1]] = parsed
    if parts[:1] == ["lora"] and parts[-1] in ("rank", "ranks") and len(parts) == 2:
        node.pop("ranks" if parts[-1] == "rank" else "rank", None)


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or True)
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        section = ".".join(str(p) for p in err["loc"][:-1]) or "top level"
        allowed = _allowed_keys(err["loc"][:-1])
        return f"{loc}: unknown setting (accepted in {section}: {', '.join(allowed)})"
    if kind == "value_error":
        text = msg.removeprefix("Value error, ")
        return text if not loc else f"{loc}: {text}"
    return f"{loc or 'config'}: {msg.lower()}, got {value!r}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for p in loc:
        ann = model.model_fields[str(p)].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
