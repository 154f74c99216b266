"""ClientPlan / ClientUpdate ↔ Flower records: the whole wire format, pure (no network).

A plan travels as a ``RecordDict`` with
- ``plan`` (ConfigRecord): client, round, rank, scale, rank_pattern (JSON string), the base
  update's versions (``base`` as JSON ``[since, version]``, or empty), whether ``init`` is set,
  train_A, the wire dtype, plain-number meta as ``meta/<key>``;
- ``plan.arrays`` (ArrayRecord): ``init/<layer>/B|A``, ``merges/<layer>/<j>/…`` (the j-th merge
  the client missed) or ``reset/<layer>/<j>/…`` (the layer's whole base delta), ``fold/<layer>/<j>/…``,
  where a term is ``B`` and ``A`` or one dense ``W``; tensor meta as ``meta/<key>``, the dense
  task head (classification) as ``head/<parameter>``.

An update travels as
- ``update`` (ConfigRecord): client (the partition id), node rank, scale, the factors sent
  (``upload``: "BA", "B" or "A"), the wire dtype, plain-number meta;
- ``update.arrays`` (ArrayRecord): ``factors/<layer>/B|A``, only the factors the plan uploads (a
  frozen one is the receiver's from the plan, a kept one never leaves the client), tensor meta,
  ``head/<parameter>``;
- ``metrics`` (MetricRecord): ``num-examples``, ``train-loss`` and the local-fit statistics.

Floating tensors are cast to the wire dtype (float32 | bfloat16 | float16) and come back as
float32; integer tensors (module indices, seeds) travel unchanged. Arrays hold the tensor's raw
little-endian bytes (``stype`` = ``RAW``): numpy has no bfloat16, and no per-array header
inflates the count, so ``ArrayRecord.count_bytes()`` is the payload plus the key names.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.methods.base import BaseUpdate, ClientPlan, ClientUpdate, Delta, Factors, complete_factors
from fedlora.ops.delta_tensors import delta_to_tensors, tensors_to_delta

RAW = "fedlora.raw-le"
"""Array.stype of a tensor's raw little-endian bytes (dtype and shape in the Array fields)."""

WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARRIVAL_DTYPE = torch.float32
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "bfloat16", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
}

PLAN, PLAN_ARRAYS = "plan", "plan.arrays"
UPDATE, UPDATE_ARRAYS, METRICS = "update", "update.arrays", "metrics"


class WireError(ValueError):
    """A record that is not a fedlora plan or update (wrong keys, dtype or shape)."""


# ---- tensors ----------------------------------------------------------------------------------


def to_array(t: torch.Tensor, wire: torch.dtype) -> Array:
    """A tensor as raw bytes; floating tensors cast to ``wire`` first."""
    t = t.detach().to("cpu")
    if t.is_floating_point():
        t = t.to(wire)
    t = t.contiguous()
    return Array(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), stype=RAW, data=_bytes(t))


def from_array(a: Array) -> torch.Tensor:
    """The tensor an Array holds; floating tensors arrive as float32."""
    if a.stype != RAW or a.dtype not in _DTYPES:
        raise WireError(f"array of stype {a.stype!r} and dtype {a.dtype!r} is not a fedlora tensor (expected stype {RAW!r})")
    dtype = _DTYPES[a.dtype]
    numel = math.prod(a.shape)
    if len(a.data) != numel * torch.empty((), dtype=dtype).element_size():
        raise WireError(f"array of shape {a.shape} and dtype {a.dtype} carries {len(a.data)} bytes")
    if numel == 0:
        t = torch.empty(a.shape, dtype=dtype)
    else:
        _check_host()
        t = torch.frombuffer(bytearray(a.data), dtype=torch.uint8).view(dtype).reshape(a.shape)
    return t.to(ARRIVAL_DTYPE) if t.is_floating_point() else t


def _bytes(t: torch.Tensor) -> bytes:
    _check_host()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _check_host() -> None:
    if sys.byteorder != "little":  # pragma: no cover - x86-64 and arm64 are little-endian
        raise WireError("fedlora's wire format needs a little-endian host")


def wire_dtype(name: str) -> torch.dtype:
    if name not in WIRE_DTYPES:
        raise WireError(f"federation.wire_dtype: unknown value {name!r} (accepted: {', '.join(WIRE_DTYPES)})")
    return WIRE_DTYPES[name]


def message_nbytes(content: RecordDict) -> int:
    """Bytes of every array in a message as Flower counts them (``ArrayRecord.count_bytes``: data + keys)."""
    return sum(record.count_bytes() for record in content.array_records.values())


# ---- meta: tensors to the ArrayRecord, plain numbers/strings to the ConfigRecord ---------------


def _put_meta(meta: Mapping[str, Any], arrays: ArrayRecord, config: ConfigRecord, wire: torch.dtype) -> None:
    for key, value in meta.items():
        if isinstance(value, torch.Tensor):
            arrays[f"meta/{key}"] = to_array(value, wire)
        elif isinstance(value, (bool, int, float, str)):
            config[f"meta/{key}"] = value
        else:
            raise WireError(f"meta[{key!r}] = {type(value).__name__}: only tensors, numbers, strings and bools cross the wire")


def _get_meta(arrays: Mapping[str, torch.Tensor], config: ConfigRecord) -> dict[str, Any]:
    meta: dict[str, Any] = {k.removeprefix("meta/"): v for k, v in config.items() if k.startswith("meta/")}
    meta.update({k.removeprefix("meta/"): v for k, v in arrays.items() if k.startswith("meta/")})
    return meta


def _put_head(head: Mapping[str, torch.Tensor], arrays: ArrayRecord, wire: torch.dtype) -> None:
    for name, t in head.items():
        arrays[f"head/{name}"] = to_array(t, wire)


def _get_head(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("head/"): t for k, t in tensors.items() if k.startswith("head/")}


def _put_delta(prefix: str, delta: Delta, arrays: ArrayRecord, wire: torch.dtype) -> None:
    for key, t in delta_to_tensors(delta, prefix).items():
        arrays[key] = to_array(t, wire)


def _get_delta(tensors: Mapping[str, torch.Tensor], prefix: str) -> Delta:
    try:
        return tensors_to_delta(tensors, prefix)
    except ValueError as e:
        raise WireError(str(e)) from None


def _get_factors(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """``<prefix>/<layer>/B|A`` → {layer: {"B": …, "A": …}} with the factors that travelled."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith(prefix + "/") and key[-2:] in ("/B", "/A"):
            out.setdefault(key[len(prefix) + 1 : -2], {})[key[-1]] = t
    return out


# ---- plans ------------------------------------------------------------------------------------


def plan_to_records(plan: ClientPlan, wire: str = "float32") -> RecordDict:
    dt = wire_dtype(wire)
    arrays = ArrayRecord()
    config = ConfigRecord({
        "client": plan.client, "round": plan.round, "rank": plan.rank, "scale": float(plan.scale),
        "rank_pattern": json.dumps(plan.rank_pattern), "base": json.dumps([plan.base.since, plan.base.version] if plan.base else []),
        "has_init": plan.init is not None, "train_A": plan.train_A, "train_B": plan.train_B, "keep_B": plan.keep_B,
        "wire_dtype": wire,
    })
    for layer, f in (plan.init or {}).items():
        arrays[f"init/{layer}/B"] = to_array(f.B, dt)
        arrays[f"init/{layer}/A"] = to_array(f.A, dt)
    if plan.base is not None:
        _put_delta("merges", plan.base.merges, arrays, dt)
        _put_delta("reset", plan.base.reset, arrays, dt)
    _put_delta("fold", plan.fold, arrays, dt)
    _put_meta(plan.meta, arrays, config, dt)
    _put_head(plan.head, arrays, dt)
    return RecordDict({PLAN: config, PLAN_ARRAYS: arrays})


def records_to_plan(content: RecordDict) -> ClientPlan:
    try:
        config, arrays = content.config_records[PLAN], content.array_records[PLAN_ARRAYS]
    except KeyError as e:
        raise WireError(f"not a fedlora plan: no record {e}") from None
    tensors = {k: from_array(a) for k, a in arrays.items()}
    init = None
    if config["has_init"]:
        pairs = _get_factors(tensors, "init")
        if any(set(f) != {"B", "A"} for f in pairs.values()):
            raise WireError("init: every layer needs B and A")
        init = {layer: Factors(f["B"], f["A"]) for layer, f in pairs.items()}
    versions = json.loads(str(config["base"]))
    base = BaseUpdate(int(versions[0]), int(versions[1]), _get_delta(tensors, "merges"), _get_delta(tensors, "reset")) if versions else None
    return ClientPlan(
        client=int(config["client"]), round=int(config["round"]), rank=int(config["rank"]), scale=float(config["scale"]),
        rank_pattern={k: int(v) for k, v in json.loads(str(config["rank_pattern"])).items()},
        init=init,
        base=base,
        fold=_get_delta(tensors, "fold"),
        train_A=bool(config["train_A"]),
        train_B=bool(config["train_B"]),
        keep_B=bool(config["keep_B"]),
        meta=_get_meta(tensors, config),
        head=_get_head(tensors),
    )


# ---- updates ----------------------------------------------------------------------------------


def update_to_records(update: ClientUpdate, upload: str = "BA", wire: str = "float32", node_rank: int | None = None,
                      stats: Mapping[str, float] | None = None) -> RecordDict:
    """The client's reply; ``stats`` (plain numbers) join num-examples and train-loss in the MetricRecord."""
    dt = wire_dtype(wire)
    arrays = ArrayRecord()
    config = ConfigRecord({"client": update.client, "scale": float(update.scale), "upload": upload, "wire_dtype": wire})
    if node_rank is not None:
        config["node_rank"] = int(node_rank)
    for layer, f in update.factors.items():
        for which, t in zip("BA", f.tensors()):
            if which in upload:  # a frozen or kept factor never travels (ClientPlan.upload)
                arrays[f"factors/{layer}/{which}"] = to_array(t, dt)
    _put_meta(update.meta, arrays, config, dt)
    _put_head(update.head, arrays, dt)
    metrics = MetricRecord({"num-examples": int(update.num_examples), "train-loss": float(update.train_loss)})
    for key, value in (stats or {}).items():
        metrics[key] = value
    return RecordDict({UPDATE: config, UPDATE_ARRAYS: arrays, METRICS: metrics})


def records_to_update(content: RecordDict, plan: ClientPlan, layers: Mapping[str, tuple[int, int]]) -> ClientUpdate:
    """The update as the server holds it: the factors that did not travel are completed from ``plan`` (``complete_factors``)."""
    try:
        config, arrays, metrics = content.config_records[UPDATE], content.array_records[UPDATE_ARRAYS], content.metric_records[METRICS]
    except KeyError as e:
        raise WireError(f"not a fedlora update: no record {e}") from None
    tensors = {k: from_array(a) for k, a in arrays.items()}
    return ClientUpdate(
        client=int(config["client"]),
        num_examples=int(metrics["num-examples"]),
        scale=float(config["scale"]),
        factors=_factors(tensors, str(config["upload"]), plan, layers),
        train_loss=float(metrics["train-loss"]),
        meta=_get_meta(tensors, config),
        head=_get_head(tensors),
    )


def _factors(tensors: Mapping[str, torch.Tensor], upload: str, plan: ClientPlan, layers: Mapping[str, tuple[int, int]]) -> dict[str, Factors]:
    if upload != plan.upload:
        raise WireError(f"update carries factors {upload!r}, the plan uploads {plan.upload!r}")
    sent = _get_factors(tensors, "factors")
    bad = [layer for layer, f in sent.items() if set(f) != set(upload)]
    if bad:
        raise WireError(f"factors/{bad[0]}: carries {sorted(sent[bad[0]])}, expected {sorted(upload)}")
    try:
        return complete_factors(sent, plan, layers)
    except KeyError as e:
        raise WireError(f"factors: unexpected layer {e}") from None
    except ValueError as e:
        raise WireError(str(e)) from None


def update_stats(content: RecordDict) -> dict[str, float]:
    """The MetricRecord's numbers other than num-examples and train-loss."""
    return {k: v for k, v in content.metric_records[METRICS].items() if k not in ("num-examples", "train-loss")}
