"""A weight delta (per layer, a list of low-rank or dense terms) as flat named tensors, and back.

The one serialised form of a delta: ``[<prefix>/]<layer>/<j>/B`` and ``…/A`` for a low-rank term,
``…/W`` for a dense one. The Flower records carry it (as Arrays), Flower's per-round delta files
hold it (safetensors). Pure: tensors in, tensors out.
"""

from __future__ import annotations

from typing import Mapping

import torch

from fedlora.ops.lowrank import Dense, LowRank, Term


def delta_to_tensors(delta: Mapping[str, list[Term]], prefix: str = "") -> dict[str, torch.Tensor]:
    head = f"{prefix}/" if prefix else ""
    out: dict[str, torch.Tensor] = {}
    for layer, terms in delta.items():
        for j, term in enumerate(terms):
            names = "W" if isinstance(term, Dense) else "BA"
            for name, t in zip(names, term.tensors()):
                out[f"{head}{layer}/{j}/{name}"] = t
    return out


def tensors_to_delta(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, list[Term]]:
    """The inverse of ``delta_to_tensors`` (keys outside ``prefix`` ignored); ValueError when a term is incomplete."""
    head = f"{prefix}/" if prefix else ""
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        if not key.startswith(head):
            continue
        layer, j, which = key[len(head):].rsplit("/", 2)
        found.setdefault(layer, {}).setdefault(int(j), {})[which] = t
    delta: dict[str, list[Term]] = {}
    for layer, terms in found.items():
        if sorted(terms) != list(range(len(terms))) or any(set(t) not in ({"A", "B"}, {"W"}) for t in terms.values()):
            raise ValueError(f"{head}{layer}: incomplete low-rank terms {sorted(terms)}")
        delta[layer] = [Dense(t["W"]) if "W" in t else LowRank(t["B"], t["A"]) for t in (terms[j] for j in range(len(terms)))]
    return delta
