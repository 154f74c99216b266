"""Every config key with its type, default, bounds and meaning, written from the config model itself.

docs/config.md is this module's output (a test compares them), so the reference cannot drift
from what ``load_config`` accepts; ``fedlora config --reference`` prints it.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedlora.config import Config

BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def type_text(annotation: Any) -> str:
    """``Literal['a', 'b'] | None`` → ``a | b | null``; plain types by name."""
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " \\| ".join(type_text(a) for a in args)
    if annotation is type(None):
        return "null"
    if args:
        inner = ", ".join(type_text(a) for a in args)
        return f"{typing.get_origin(annotation).__name__}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def bounds_text(info: FieldInfo) -> str:
    found = []
    for meta in info.metadata:
        for attr, sign in BOUNDS:
            if (v := getattr(meta, attr, None)) is not None:
                found.append(f"{sign} {v:g}" if isinstance(v, float) else f"{sign} {'2^63' if v == 2**63 else v}")
    if getattr(info, "allow_inf_nan", None) is False or any(getattr(m, "allow_inf_nan", None) is False for m in info.metadata):
        found.append("finite")
    return ", ".join(found)


def default_text(info: FieldInfo) -> str:
    """The default as it would be written in YAML or an override."""
    value = info.get_default(call_default_factory=True)
    return "null" if value is None else f"`{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}`"


def rows(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, bounds, meaning) for every leaf setting, sections expanded in order."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += rows(ann, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", type_text(ann), default_text(info), bounds_text(info), info.description or ""))
    return out


def reference_markdown() -> str:
    lines = [
        "# Config reference",
        "",
        "Every setting of a fedlora config: a YAML file of these sections, and `key=value` overrides on the command",
        "line (`fedlora run configs/tiny.yaml federation.rounds=5 lora.ranks=[8,4,2]`). Written by",
        "`fedlora config --reference` from the config model itself; `fedlora config CONFIG [key=value …]` prints a",
        "resolved config. Method options (`federation.options.KEY`) are listed by `fedlora methods`.",
        "",
        "| key | type | default | bounds | meaning |",
        "|---|---|---|---|---|",
    ]
    for key, kind, default, bounds, meaning in rows():
        meaning = meaning.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | {default} | {bounds} | {meaning} |")
    return "\n".join(lines) + "\n"
