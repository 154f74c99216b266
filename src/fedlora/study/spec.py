"""A study file: a base config, factors crossed with seeds, and the cells they make.

```yaml
config: ../configs/study-lm.yaml     # the base config (relative to this file), or a packaged name: tiny
overrides: [federation.rounds=100]   # shared by every cell
seeds: 3                             # seeds seed, seed+1, …; or a list [0, 1, 2]
factors:                             # crossed: every combination, times every seed
  method: [flora, fedplora, fedit]   # a config key (method = federation.method), one label per value
  steps: {key: train.local_steps, values: [2, 10]}
  profile:                           # labelled settings: label → overrides
    hetero: {lora.ranks: [64, 32, 16, 8, 4]}
    homo: {lora.rank: 16}
exclude:                             # cells to leave out: every named factor matches
  - {steps: 10, method: [fedit]}
one_rank: 4                          # rank for methods that need one rank for all (default: the smallest)
metric: loss                         # what the statistics compare: loss (lower wins) or accuracy
targets: {loss: 2.5}                 # rounds and MB until the global metric first reaches it
reference: flora                     # paired differences against this level of `method` (else of the first factor); default: every pair
```

Every cell is an ordinary run folder ``<output>/runs/<labels>-seed<s>``; all seeds are scored on the
first seed's global test split, so the spread over seeds measures training, not the held-out draw.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedlora.config import Config, ConfigError, load_config, packaged_config

ALIASES = {"method": "federation.method"}
KEYS = {"config", "overrides", "seeds", "factors", "exclude", "one_rank", "metric", "targets", "reference", "title"}


@dataclass(frozen=True)
class Cell:
    """One run of the study: its factor labels, its seed, and the overrides on top of the base config."""

    labels: dict[str, str]
    seed: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return "-".join([*self.labels.values(), f"seed{self.seed}"])

    @property
    def setting(self) -> str:
        """The cell without its seed: the runs that the statistics pool."""
        return "-".join(self.labels.values())


@dataclass(frozen=True)
class Study:
    path: Path
    config: Path
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    factors: dict[str, dict[str, tuple[str, ...]]]  # factor → label → overrides
    exclude: tuple[dict[str, tuple[str, ...]], ...] = ()
    one_rank: int | None = None
    metric: str = "loss"
    targets: dict[str, float] = field(default_factory=dict)
    reference: str | None = None
    title: str = ""

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def compared(self) -> str:
        """The factor whose levels the paired tests compare: ``method``, else the first factor."""
        return "method" if "method" in self.factors else next(iter(self.factors), "")

    def cells(self) -> list[Cell]:
        """Every combination of factor labels × seeds, less the excluded, in the file's order (seed last).

        A method that declares one rank for every client (``ranks = "one"``: fedit, ffa, …) runs at ``one_rank``: by default the
        smallest client rank, which every client can afford.
        """
        from fedlora.methods import MethodError
        from fedlora.methods.registry import needs_one_rank

        names = list(self.factors)
        out = []
        for combo in itertools.product(*(self.factors[n].items() for n in names)):
            labels = {n: label for n, (label, _) in zip(names, combo)}
            if any(all(labels[k] in v for k, v in rule.items()) for rule in self.exclude):
                continue
            overrides = tuple(o for _, ovs in combo for o in ovs)
            try:
                cfg = load_config(self.config, [*self.overrides, *overrides])
            except ConfigError as e:
                raise ConfigError(f"study {self.path.name}: cell {'-'.join(labels.values())}: {e}") from None
            try:
                one_rank = needs_one_rank(cfg.federation.method, cfg.client_ranks())  # declared by the method: nothing is built
            except MethodError:
                one_rank = False  # an unknown method: load_study's preflight names it, cell by cell
            if one_rank:
                overrides = (*overrides, f"lora.rank={self.one_rank or min(cfg.client_ranks())}")
            out += [Cell(labels, s, (*overrides, f"seed={s}")) for s in self.seeds]
        return out

    def method_of(self, cell: Cell) -> str:
        return self.cell_config(cell).federation.method

    def cell_config(self, cell: Cell) -> Config:
        return load_config(self.config, [*self.overrides, *cell.overrides])


def _err(path: Path, key: str, value: Any, accepted: str) -> ConfigError:
    return ConfigError(f"study {path.name}: {key}: invalid value {value!r} (accepted: {accepted})")


def _label(value: Any) -> str:
    """A value as part of a folder name: ``[64, 32]`` → ``64_32``, ``a/b`` → ``a_b``."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    for ch in "[]{}\"' ":
        text = text.replace(ch, "")
    return text.replace("/", "_").replace(",", "_").replace(":", "_") or "none"


def _override(key: str, value: Any) -> str:
    return f"{ALIASES.get(key, key)}={value if isinstance(value, str) else json.dumps(value)}"


def _prefix(key: str) -> str:
    """What a value's label starts with: nothing for a method, else the key's last part (local_steps10)."""
    key = ALIASES.get(key, key)
    return "" if key == "federation.method" else key.rsplit(".", 1)[-1]


def _factor(path: Path, name: str, spec: Any) -> tuple[str, dict[str, tuple[str, ...]]]:
    """(label prefix, label → overrides), from a list of values, ``{key, values}``, or ``{label: {key: value, …}}``."""
    accepted = "a list of values of a config key, {key: KEY, values: [...]}, or {label: {key: value, ...}, ...}"
    key, prefix = name, _prefix(name)
    if isinstance(spec, dict) and set(spec) == {"key", "values"}:  # the factor's name labels its values: steps2
        key, spec, prefix = str(spec["key"]), spec["values"], ("" if _prefix(str(spec["key"])) == "" else name)
        if not isinstance(spec, list) or not spec:
            raise _err(path, f"factors.{name}.values", spec, "a non-empty list")
    if isinstance(spec, list) and spec:
        levels = {f"{prefix}{_label(v)}": (_override(key, v),) for v in spec}
        if len(levels) < len(spec):
            raise _err(path, f"factors.{name}", spec, "distinct values")
        return prefix, levels
    if isinstance(spec, dict) and spec and all(isinstance(v, dict) and v for v in spec.values()):
        return "", {_label(label): tuple(_override(k, v) for k, v in settings.items()) for label, settings in spec.items()}
    raise _err(path, f"factors.{name}", spec, accepted)


def load_study(path: str | Path) -> Study:
    """Read and check a study file: every cell's config must validate before any run starts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study: file not found: {path} (accepted: a study YAML file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"study {path.name}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"study {path.name}: must hold a mapping, got {type(raw).__name__} (accepted: {', '.join(sorted(KEYS))})")
    if unknown := set(raw) - KEYS:
        raise ConfigError(f"study {path.name}: unknown key {sorted(unknown)[0]!r} (accepted: {', '.join(sorted(KEYS))})")
    base = raw.get("config", "default")
    config = (path.parent / base) if (path.parent / str(base)).is_file() else packaged_config(str(base))
    if not config.is_file():
        raise _err(path, "config", base, "a YAML file relative to the study file, or a packaged config: default, tiny, classification, …")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise _err(path, "overrides", overrides, "a list of key=value strings")
    first = load_config(config, overrides)
    if first.data.global_test_seed is None:  # every seed scored on the same held-out examples
        overrides = [*overrides, f"data.global_test_seed={first.seed}"]
    seeds = raw.get("seeds", 3)
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1:
        seeds = [first.seed + i for i in range(seeds)]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise _err(path, "seeds", raw.get("seeds"), "a count >= 1 or a list of distinct seeds >= 0")
    factors_raw = raw.get("factors") or {}
    if not isinstance(factors_raw, dict):
        raise _err(path, "factors", factors_raw, "a mapping of factor name to values")
    parsed = {str(n): _factor(path, str(n), spec) for n, spec in factors_raw.items()}
    factors = {n: levels for n, (_, levels) in parsed.items()}
    exclude = []
    for rule in raw.get("exclude") or []:
        if not isinstance(rule, dict) or not rule or set(rule) - set(factors):
            raise _err(path, "exclude", rule, f"mappings of factor names ({', '.join(factors)}) to values or labels")
        exclude.append({k: _labels_of(path, k, parsed[k], v) for k, v in rule.items()})
    metric = raw.get("metric", "loss")
    if metric not in ("loss", "accuracy"):
        raise _err(path, "metric", metric, "loss, accuracy")
    targets = raw.get("targets") or {}
    if not isinstance(targets, dict) or not all(k in ("loss", "accuracy") and isinstance(v, (int, float)) for k, v in targets.items()):
        raise _err(path, "targets", targets, "{loss: X, accuracy: Y}")
    one_rank = raw.get("one_rank")
    if one_rank is not None and (not isinstance(one_rank, int) or one_rank < 1):
        raise _err(path, "one_rank", one_rank, "an integer >= 1")
    study = Study(path, config, tuple(overrides), tuple(seeds), factors, tuple(exclude), one_rank, metric,
                  {k: float(v) for k, v in targets.items()}, raw.get("reference"), str(raw.get("title") or ""))
    cells = study.cells()
    compared = study.compared
    if study.reference is not None and study.reference not in study.factors.get(compared, {}):
        raise _err(path, "reference", study.reference, f"a label of the factor {compared!r}: {', '.join(study.factors.get(compared, {}))}")
    if not cells:
        raise ConfigError(f"study {path.name}: no cells (accepted: factors and exclude that leave at least one run)")
    from fedlora.app.preflight import preflight
    from fedlora.methods import MethodError

    for cell in cells:  # every setting and method error now, one line, before any run
        try:
            preflight(study.cell_config(cell))
        except (ConfigError, MethodError) as e:
            raise ConfigError(f"study {path.name}: cell {cell.name}: {e}") from None
    return study


def _labels_of(path: Path, name: str, factor: tuple[str, dict[str, tuple[str, ...]]], value: Any) -> tuple[str, ...]:
    """A rule's value (a label or a factor value, or a list of them) → the factor's labels."""
    prefix, levels = factor
    out = []
    for v in value if isinstance(value, list) else [value]:
        label = next((lab for lab in (_label(v), f"{prefix}{_label(v)}") if lab in levels), None)
        if label is None:
            raise _err(path, f"exclude.{name}", v, ", ".join(levels))
        out.append(label)
    return tuple(out)
