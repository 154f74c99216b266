"""Method names → classes: filled next to each method, and from outside the package.

A method module registers its class with ``@register``; this module imports only ``base`` and
``errors``, so a method file can import it without a cycle. A method in a researcher's own
package needs no fork: ``federation.method=my_pkg.my_module:MyMethod`` imports that class, and an
installed package's entry point in the group ``fedlora.methods`` (its name the method's ``name``)
makes a plain name work. Either is imported when first asked for, in every process that builds
the method (simulator, every Flower node), and registered under the class's ``name``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from typing import Any

from fedlora.methods.base import Method, Setup
from fedlora.methods.errors import MethodError

GROUP = "fedlora.methods"
"""The entry-point group of methods outside the package (``[project.entry-points."fedlora.methods"]``)."""

REGISTRY: dict[str, type[Method]] = {}

CHOICES = {"ranks": ("one", "any"), "scales": ("one", "any")}
FLAGS = ("exact", "merges", "sums_only")


def register(cls: type[Method]) -> type[Method]:
    """Add a method class under its ``name`` (a class decorator). The same class again is a no-op;
    another class under a taken name, or a declaration outside its accepted values, is a ValueError."""
    problem = _problem(cls)
    if problem:
        raise ValueError(problem)
    held = REGISTRY.get(cls.name)
    if held is not None and held is not cls:
        raise ValueError(f"method name {cls.name!r} of {_where(cls)} is already registered by {_where(held)} (accepted: a name of its own)")
    REGISTRY[cls.name] = cls
    return cls


def declared(cls: type[Method] | Method) -> dict[str, Any]:
    """What a method declares for everybody else (tests, compare, export, benches, docs)."""
    return {"ranks": cls.ranks, "scales": cls.scales, "exact": cls.exact, "merges": cls.merges, "sums_only": cls.sums_only, "kind": cls.kind}


def method_class(name: str) -> type[Method]:
    """The class behind a ``federation.method`` value: a registered name, an entry point's name, or ``package.module:Class``."""
    if isinstance(name, str) and name in REGISTRY:
        return REGISTRY[name]
    if isinstance(name, str) and ":" in name:
        return _from_path(name)
    if isinstance(name, str) and (ep := _entry_point(name)) is not None:
        return _from_entry_point(ep)
    pool = [*REGISTRY, *(ep.name for ep in entry_points())]
    near = difflib.get_close_matches(str(name).lower(), pool, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise MethodError(f"federation.method: unknown value {name!r} ({hint}accepted: {', '.join(sorted(set(pool)))}, or package.module:Class)")


def build_method(name: str, setup: Setup) -> Method:
    return method_class(name)(setup)


def needs_one_rank(name: str, ranks: list[int]) -> bool:
    """Whether method ``name`` declares one rank for every client (``ranks = "one"``) and these client ranks differ."""
    return method_class(name).ranks == "one" and len(set(ranks)) > 1


def available() -> dict[str, type[Method]]:
    """Every method this process can build by name: the package's and each installed entry point's (imported now)."""
    for ep in entry_points():
        if ep.name not in REGISTRY:
            _from_entry_point(ep)
    return REGISTRY


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of the group, one per name (the first one found wins)."""
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        seen.setdefault(ep.name, ep)
    return list(seen.values())


def _entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    return next((ep for ep in entry_points() if ep.name == name), None)


def _from_entry_point(ep: importlib.metadata.EntryPoint) -> type[Method]:
    where = f"entry point {ep.name} = {ep.value!r} (group {GROUP})"
    try:
        cls = ep.load()
    except (ImportError, AttributeError) as e:
        raise MethodError(f"federation.method: {where} cannot be loaded: {type(e).__name__}: {e} (accepted: an importable package.module:Class)") from e
    cls = _checked(cls, where)
    if cls.name != ep.name:
        raise MethodError(f"federation.method: {where} loads a method named {cls.name!r} (accepted: the entry point named as its method, {cls.name!r})")
    return _registered(cls, where)


def _from_path(path: str) -> type[Method]:
    """``package.module:Class`` (or ``:Outer.Inner``) imported and registered under the class's ``name``."""
    module, _, attr = path.partition(":")
    accepted = "accepted: a registered name, or package.module:Class importable here"
    if not module or not attr or not all(p.isidentifier() for p in [*module.split("."), *attr.split(".")]):
        raise MethodError(f"federation.method: invalid value {path!r} ({accepted})")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise MethodError(f"federation.method: {path!r}: cannot import {module}: {e} ({accepted})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MethodError(f"federation.method: {path!r}: {module} has no {attr} ({accepted})")
        obj = getattr(obj, part)
    return _registered(_checked(obj, repr(path)), repr(path))


def _checked(obj: Any, where: str) -> type[Method]:
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise MethodError(f"federation.method: {where} is {obj!r}, not a method class (accepted: a subclass of fedlora.methods.Method)")
    if problem := _problem(obj):
        raise MethodError(f"federation.method: {where}: {problem}")
    return obj


def _registered(cls: type[Method], where: str) -> type[Method]:
    held = REGISTRY.get(cls.name)
    if held is not None and held is not cls:
        raise MethodError(f"federation.method: {where} is named {cls.name!r}, the name of {_where(held)} (accepted: a class with a name of its own)")
    return register(cls)


def _problem(cls: Any) -> str | None:
    """What is wrong with a class's declarations, in one line; None when nothing is."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or ":" in name:
        return f"{_where(cls)} declares name = {name!r} (accepted: a non-empty name without ':')"
    if not isinstance(getattr(cls, "summary", None), str):
        return f"method {name!r} ({_where(cls)}) declares no summary (accepted: one line saying what it does)"
    for key, accepted in CHOICES.items():
        if getattr(cls, key) not in accepted:
            return f"method {name!r} declares {key} = {getattr(cls, key)!r} (accepted: {', '.join(accepted)})"
    for key in FLAGS:
        if not isinstance(getattr(cls, key), bool):
            return f"method {name!r} declares {key} = {getattr(cls, key)!r} (accepted: True, False)"
    from fedlora.methods.sums import Sums

    if cls.sums_only != issubclass(cls, Sums):
        return (f"method {name!r} declares sums_only = {cls.sums_only} but is {'not ' if cls.sums_only else ''}a fedlora.methods.sums.Sums "
                "(accepted: a Sums subclass, which declares contribution and from_means, with sums_only = True; any other with False)")
    return None


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
