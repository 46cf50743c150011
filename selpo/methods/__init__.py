"""Training methods, each one object (a ``Method``: its options, stages, strength and grid, token view, examples and
loss) in one registry that the configuration, the pipeline, the stages, the report and ``selpo compare`` read.

A new method is one new file here (or anywhere) defining its ``Method`` subclass, with its options (a dataclass:
its configuration section) and any stage of its own (a ``selpo.stage.Stage``), and its registration:
``register(MyMethod())``, as below for the built-in ones; or, from another distribution, an entry point of the group
``selpo.methods`` naming the subclass (``my_method = "my_package.my_module:MyMethod"``), loaded the first time the
registry is read, so that ``selpo run --set method=my_method`` finds it. The loop (``selpo.trainer``) is the same
for all.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points

from ..stage import FIRST, LAST, Stage
from .base import LOG_RATIO_LEGEND, Method, Prepared, TokenLogps, view_row
from .dpo import DPO, DPOMethod, with_reference_logps
from .guidance import GuidanceMethod, RewardWeightedLikelihood, TokenRewardRanking, reward_weights
from .selective_dpo import SelectiveDPO, SelectiveDPOMethod, quantile_mask, selection_scores, selective_mask
from .sepo import SePO, SePOMethod
from .simpo import SimPO, SimPOMethod

ENTRY_POINTS = "selpo.methods"  # the entry-point group of methods defined outside selpo
_REGISTRY: dict[str, Method] = {}
_entry_points_loaded = False


def register(method: Method) -> Method:
    """Makes ``method`` runnable as ``method = <its name>``, its options the section [<its name>]; returns it."""
    missing = [a for a in ("name", "title", "strength", "grid") if not hasattr(method, a)]
    if missing:
        raise ValueError(f"method {type(method).__name__} does not set {', '.join(missing)}")
    if not method.name.isidentifier():
        raise ValueError(f"method name must be an identifier, got {method.name!r}")
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    if not method.grid:
        raise ValueError(f"method {method.name!r}: grid must hold at least one value of {method.strength}")
    _check_options(method.name, method.options, f"method {method.name!r}: options")
    _check_stages(method)
    _REGISTRY[method.name] = method
    return method


def _check_options(section: str, options, what: str) -> None:
    """An options class must be a dataclass whose SECTION is the section it becomes, one no other owner holds."""
    if options is None:
        return
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ValueError(f"{what} must be a dataclass (see selpo.options), got {options!r}")
    if getattr(options, "SECTION", None) != section:
        raise ValueError(f"{what}: {options.__name__}.SECTION must be {section!r}, the section it becomes")
    if section in (s.name for s in FIRST + LAST):
        raise ValueError(f"{what}: [{section}] is a section of the run's own; choose another name")
    owners = [(m.name, m.options) for m in _REGISTRY.values()] + [(s.name, s.options) for s in _own_stages()]
    if any(name == section and owner not in (None, options) for name, owner in owners):
        raise ValueError(f"{what}: the section [{section}] is already another's")


def _own_stages() -> list[Stage]:
    """The stages the methods registered so far run between data and train, each once, in registration order."""
    return list({s.name: s for method in _REGISTRY.values() for s in method.stages}.values())


def _check_stages(method: Method) -> None:
    known = {s.name: s for s in _own_stages()}
    for stage in method.stages:
        if not isinstance(stage, Stage):
            raise ValueError(f"method {method.name!r}: stages holds the stages it runs between data and train, each a "
                             f"selpo.stage.Stage, got {stage!r}")
        if stage.name in (s.name for s in FIRST + LAST):
            raise ValueError(f"method {method.name!r}: stage {stage.name!r} is one every method runs already")
        if known.get(stage.name, stage) != stage:
            raise ValueError(f"method {method.name!r}: another method declares a different stage {stage.name!r}")
        _check_options(stage.name, stage.options, f"stage {stage.name!r} of method {method.name!r}: options")
        before = {"data"} | {s.name for s in method.stages[:method.stages.index(stage)]}
        if stage.needs is not None and not set(stage.needs) <= before:
            raise ValueError(f"method {method.name!r}: stage {stage.name!r} must name the stages it reads (needs), "
                             f"among those it runs before it: {', '.join(sorted(before))}")


def _registry() -> dict[str, Method]:
    """The registered methods, those of the ``selpo.methods`` entry points loaded on the first call."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for point in entry_points(group=ENTRY_POINTS):
            where = f"entry point {point.name} = {point.value} (group {ENTRY_POINTS})"
            try:
                loaded = point.load()
            except Exception as e:
                raise ValueError(f"{where} cannot be loaded: {type(e).__name__}: {e}") from e
            method = loaded() if isinstance(loaded, type) else loaded
            if not isinstance(method, Method):
                raise ValueError(f"{where} names {loaded!r}, not a selpo.methods.Method subclass or instance")
            if getattr(method, "name", None) != point.name:
                raise ValueError(f"{where} gives method {getattr(method, 'name', None)!r}: the names must match")
            register(method)
    return _REGISTRY


def get(name: str) -> Method:
    """The registered method ``name``; a ValueError naming the key ``method`` and the choices otherwise."""
    if name not in _registry():
        raise ValueError(f"method must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_registry())


def stages() -> dict[str, Stage]:
    """Every stage of the registered methods by name, in pipeline order: data, the methods' own (in registration
    order), train, eval, report."""
    _registry()
    return {s.name: s for s in FIRST + tuple(_own_stages()) + LAST}


for _method in (SePOMethod(), SelectiveDPOMethod(), GuidanceMethod(), DPOMethod(), SimPOMethod()):
    register(_method)

__all__ = ["DPO", "ENTRY_POINTS", "LOG_RATIO_LEGEND", "Method", "Prepared", "RewardWeightedLikelihood", "SePO",
           "SelectiveDPO", "SimPO", "TokenLogps", "TokenRewardRanking", "get", "names", "quantile_mask", "register",
           "reward_weights", "selection_scores", "selective_mask", "stages", "view_row", "with_reference_logps"]
