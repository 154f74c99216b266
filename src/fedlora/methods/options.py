"""Method options (``federation.options.*``) checked against what each method accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from fedlora.methods.errors import MethodError
from fedlora.ops.weights import POLICIES, Weighting


@dataclass(frozen=True)
class Option:
    """One option: its default, a one-line help, and either allowed values or a numeric range."""

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None

    def accepted(self) -> str:
        if self.choices is not None:
            return ", ".join(map(str, self.choices))
        lo = "-inf" if self.low is None else self.low
        hi = "inf" if self.high is None else self.high
        return f"a number in [{lo}, {hi}]"

    def check(self, method: str, key: str, value: Any) -> Any:
        bad = MethodError(f"federation.options.{key}: invalid value {value!r} for {method} (accepted: {self.accepted()})")
        if self.choices is not None:
            if value not in self.choices:
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise bad
        return value


WEIGHTS = Option("data", "w_k: the example count n_k (data), 1 (uniform) or min(n_k, weight_cap) (capped)", choices=POLICIES)
"""The ``weights`` option of every method that may weigh clients either way (ops/weights.py's ``Weighting``)."""

WEIGHT_CAP = Option(0, "with weights: capped, the largest weight in examples (> 0)", low=0)

WEIGHTING = {"weights": WEIGHTS, "weight_cap": WEIGHT_CAP}
"""The options of a method that weighs clients by a ``Weighting``: ``options = {**WEIGHTING, ...}``."""


def weighting(method: str, opts: Mapping[str, Any]) -> Weighting:
    """The ``Weighting`` the options ask for; ``capped`` without a positive cap is one MethodError line."""
    policy, cap = opts.get("weights", "data"), float(opts.get("weight_cap", 0))
    if policy == "capped" and cap <= 0:
        raise MethodError(f"federation.options.weight_cap: invalid value {opts.get('weight_cap', 0)!r} for {method} with weights: capped (accepted: a number of examples > 0)")
    return Weighting(policy, cap)


def read_options(method: str, spec: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in; an unknown key or a bad value is one MethodError line."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        accepted = ", ".join(sorted(spec)) or "none"
        raise MethodError(f"federation.options.{unknown[0]}: unknown option for {method} (accepted: {accepted})")
    return {key: opt.check(method, key, given.get(key, opt.default)) for key, opt in spec.items()}
