"""Aggregation methods, looked up by name in one registry (``methods/registry.py``).

Each method module registers its class next to it (``@register``); importing them here, in this
order, fills the registry in the order ``fedlora methods`` lists them.
"""

from __future__ import annotations

from fedlora.methods.base import ClientPlan, ClientUpdate, Delta, Factors, Method, Setup
from fedlora.methods.errors import MethodError
from fedlora.methods.registry import REGISTRY, available, build_method, declared, method_class, register
from fedlora.methods.flora import FLoRA
from fedlora.methods.fedplora import FedPLoRA
from fedlora.methods.fedit import FedIT
from fedlora.methods.zeropad import ZeroPad
from fedlora.methods.hetlora import HetLoRA
from fedlora.methods.flexlora import FlexLoRA
from fedlora.methods.ffa import FFALoRA
from fedlora.methods.fedsa import FedSA
from fedlora.methods.fedex import FedEx
from fedlora.methods.rolora import RoLoRA
from fedlora.methods.florist import FLoRIST
from fedlora.methods.full import FullFedAvg
from fedlora.methods.centralized import Centralized
from fedlora.methods.local import LocalOnly

__all__ = [
    "REGISTRY", "ClientPlan", "ClientUpdate", "Delta", "Factors", "Method", "MethodError", "Setup",
    "available", "build_method", "declared", "method_class", "register",
    "Centralized", "FFALoRA", "FLoRA", "FLoRIST", "FedEx", "FedIT", "FedPLoRA", "FedSA", "FlexLoRA", "FullFedAvg", "HetLoRA", "LocalOnly", "RoLoRA", "ZeroPad",
]
