"""Training methods, each one object (a ``Method``: its stages, strength and grid, token view, examples and
loss) in one registry that the configuration, the pipeline, the stages, the report and ``selpo compare`` read.

A new method is one new file here (or anywhere) defining its ``Method`` subclass, and its registration:
``register(MyMethod())``, as below for the built-in ones. The loop (``selpo.trainer``) is the same for all.
"""

from __future__ import annotations

from .base import LOG_RATIO_LEGEND, Method, Prepared, TokenLogps, view_row
from .dpo import DPO, DPOMethod, with_reference_logps
from .guidance import GuidanceMethod, RewardWeightedLikelihood, TokenRewardRanking, reward_weights
from .selective_dpo import SelectiveDPO, SelectiveDPOMethod, quantile_mask, selection_scores, selective_mask
from .sepo import SePO, SePOMethod
from .simpo import SimPO, SimPOMethod

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Makes ``method`` runnable as ``method = <its name>``; returns it."""
    missing = [a for a in ("name", "title", "stages", "strength", "grid") if not hasattr(method, a)]
    if missing:
        raise ValueError(f"method {type(method).__name__} does not set {', '.join(missing)}")
    if not method.name.isidentifier():
        raise ValueError(f"method name must be an identifier, got {method.name!r}")
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    if not method.grid:
        raise ValueError(f"method {method.name!r}: grid must hold at least one value of {method.strength}")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name``; a ValueError naming the key ``method`` and the choices otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_REGISTRY)


for _method in (SePOMethod(), SelectiveDPOMethod(), GuidanceMethod(), DPOMethod(), SimPOMethod()):
    register(_method)

__all__ = ["DPO", "LOG_RATIO_LEGEND", "Method", "Prepared", "RewardWeightedLikelihood", "SePO", "SelectiveDPO",
           "SimPO", "TokenLogps", "TokenRewardRanking", "get", "names", "quantile_mask", "register",
           "reward_weights", "selection_scores", "selective_mask", "view_row", "with_reference_logps"]
