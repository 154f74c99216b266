"""Aggregation methods, looked up by name in one explicit registry."""

from __future__ import annotations

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Method, Setup
from fedlora.methods.errors import MethodError
from fedlora.methods.centralized import Centralized
from fedlora.methods.fedex import FedEx
from fedlora.methods.fedit import FedIT
from fedlora.methods.fedplora import FedPLoRA
from fedlora.methods.fedsa import FedSA
from fedlora.methods.flora import FLoRA
from fedlora.methods.florist import FLoRIST
from fedlora.methods.full import FullFedAvg
from fedlora.methods.ffa import FFALoRA
from fedlora.methods.flexlora import FlexLoRA
from fedlora.methods.hetlora import HetLoRA
from fedlora.methods.local import LocalOnly
from fedlora.methods.rolora import RoLoRA
from fedlora.methods.zeropad import ZeroPad

REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Add a method class under its ``name``; a duplicate name is a programming error."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls
    return cls


for _cls in (FLoRA, FedPLoRA, FedIT, ZeroPad, HetLoRA, FlexLoRA, FFALoRA, FedSA, FedEx, RoLoRA, FLoRIST, FullFedAvg, Centralized, LocalOnly):
    register(_cls)


def build_method(name: str, setup: Setup) -> Method:
    if name not in REGISTRY:
        import difflib

        near = difflib.get_close_matches(str(name).lower(), REGISTRY, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise MethodError(f"federation.method: unknown value {name!r} ({hint}accepted: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name](setup)


__all__ = ["REGISTRY", "ClientPlan", "ClientUpdate", "Delta", "Factors", "Method", "MethodError", "Setup", "build_method", "register"]
