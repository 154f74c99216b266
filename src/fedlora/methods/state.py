"""A method's state as tensors + JSON, and back: what a checkpoint holds (no pickle).

Every method names its state in ``state_keys`` (attribute paths such as ``base.history``);
``pack`` turns nested dicts, lists, tensors, ``LowRank`` pairs, ``Dense`` matrices and plain numbers
into a JSON skeleton whose leaves point into a flat ``{key: tensor}`` map, and ``unpack``
rebuilds them. A tensor object reached twice is stored once and comes back as one object:
diagnostics recognise shared low-rank terms (FLoRA's merges, held by the server and by every
client's base) by identity, so a resumed run computes exactly what an uninterrupted one does.
Pure: no files here.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from fedlora.methods.base import Method
from fedlora.ops.lowrank import Dense, LowRank

Tensors = dict[str, torch.Tensor]


def pack(obj: Any, tensors: Tensors, memo: dict[int, str] | None = None) -> Any:
    """JSON skeleton of ``obj``; its tensors are added to ``tensors`` (deduplicated by identity)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = key = f"t{len(tensors)}"
            tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"tensor": memo[id(obj)]}
    if isinstance(obj, LowRank):
        return {"LowRank": [pack(obj.B, tensors, memo), pack(obj.A, tensors, memo)]}
    if isinstance(obj, Dense):
        return {"Dense": pack(obj.W, tensors, memo)}
    if isinstance(obj, dict):
        return {"dict": [[k, pack(v, tensors, memo)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list": [pack(v, tensors, memo) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def unpack(skeleton: Any, tensors: Tensors, memo: dict[str, torch.Tensor] | None = None) -> Any:
    """The inverse of ``pack``; one key gives one tensor object."""
    memo = {} if memo is None else memo
    (kind, body), = skeleton.items()
    if kind == "tensor":
        return memo.setdefault(body, tensors[body])
    if kind == "LowRank":
        B, A = (unpack(x, tensors, memo) for x in body)
        return LowRank(B, A)
    if kind == "Dense":
        return Dense(unpack(body, tensors, memo))
    if kind == "dict":
        return {k: unpack(v, tensors, memo) for k, v in body}
    if kind == "list":
        return [unpack(v, tensors, memo) for v in body]
    if kind == "value":
        return body
    raise ValueError(f"unknown state entry {kind!r}")


def state_of(method: Method) -> dict[str, Any]:
    """The live objects that make up the method's state, by attribute path."""
    return {path: operator.attrgetter(path)(method) for path in method.state_keys}


def load_state(method: Method, state: dict[str, Any]) -> None:
    """Put ``state`` (as ``state_of`` gave it, after a round trip) back into a freshly built method."""
    if set(state) != set(method.state_keys):
        raise ValueError(f"{method.name}: state holds {sorted(state)}, expected {sorted(method.state_keys)}")
    for path, value in state.items():
        owner, _, attr = path.rpartition(".")
        setattr(operator.attrgetter(owner)(method) if owner else method, attr, value)
    method.after_load()


def state_dict(method: Method) -> tuple[Tensors, dict[str, Any]]:
    """The method's state on its own: ``(tensors, JSON)``, ready for safetensors and json."""
    tensors: Tensors = {}
    return tensors, {"method": method.name, "state": pack(state_of(method), tensors)}


def load_state_dict(method: Method, tensors: Tensors, meta: dict[str, Any]) -> None:
    """The inverse of ``state_dict`` into a method built for the same setup."""
    if meta.get("method") != method.name:
        raise ValueError(f"state of method {meta.get('method')!r} cannot load into {method.name!r}")
    load_state(method, unpack(meta["state"], tensors))
