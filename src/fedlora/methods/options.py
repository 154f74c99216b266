"""Method options (``federation.options.*``) checked against what each method accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from fedlora.methods.errors import MethodError


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


WEIGHTS = Option("data", "p_k from example counts (data) or 1/K (uniform)", choices=("data", "uniform"))
"""The ``weights`` option of every method that may weigh clients either way."""


def read_options(method: str, spec: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in; an unknown key or a bad value is one MethodError line."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        accepted = ", ".join(sorted(spec)) or "none"
        raise MethodError(f"federation.options.{unknown[0]}: unknown option for {method} (accepted: {accepted})")
    return {key: opt.check(method, key, given.get(key, opt.default)) for key, opt in spec.items()}
