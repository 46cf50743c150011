"""A loss ``linear_selective_loss`` can end in, as one registered spec: adding a loss is one file that defines a
``FusedLoss`` and passes it to ``register``.

Every such loss gives each response (segment) a reward linear in its selected tokens' log-probs (``Linear``),
and ends in one of two shapes: pairwise, the Bradley-Terry loss over pairs laid out chosen_0..chosen_{P-1},
rejected_0..rejected_{P-1}, ``mean over pairs of -logsigmoid(r_chosen - r_rejected - offset)``; or per
sequence, ``mean over sequences of r``. Linearity is what lets the fused path form dL/dlogp of a chunk of
pairs in a few kernels while its logits are still in the buffer, with no autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import checks


@dataclass(frozen=True)
class Option:
    """A number a loss takes (``linear_selective_loss(..., name=value)``): its default, and whether it must be
    > 0 (otherwise only finite)."""

    default: float
    positive: bool = False


@dataclass(frozen=True)
class Linear:
    """Each response's reward as a linear function of its selected tokens' log-probs:
    ``reward[s] = scale[s] * sum over the tokens t of s of (slope[t] * logp[t] + shift[t])``, and for a pairwise
    loss the ``offset`` a pair's reward margin is compared with."""

    scale: torch.Tensor | float
    slope: torch.Tensor | None = None  # None: 1
    shift: torch.Tensor | None = None  # None: 0
    offset: float = 0.0


@dataclass(frozen=True)
class FusedLoss:
    """A loss ``linear_selective_loss`` can end in.

    ``full(logps [N], cu_seqlens, mask [N], backend, **inputs, **options) -> (loss, metrics)``: the loss over the
    ``mask``-selected tokens of a full token layout, differentiable w.r.t. logps (the naive path's reference;
    inputs checked, backend resolved). ``compact(counts [S], **inputs, **options) -> Linear``: the same loss's
    rewards, given each segment's number of selected tokens (``counts``, float) and the per-token ``inputs`` of
    the selected tokens only, in the order the fused path lays them out (slope and shift come back in it).

    ``inputs``: the float [N] tensors the loss reads per token (constants: no gradient reaches them), passed by
    name. ``options``: the numbers it takes. ``mean``: its rewards are means over each response's selected
    tokens, so each response must keep one. ``reads(**inputs) -> bool [N]``: without a mask or scores, the
    tokens it reads (default: every valid one). ``metric``: the name of a per-sequence loss's [S] rewards
    among its metrics (a pairwise loss reports chosen_reward, rejected_reward, margin and accuracy).
    """

    name: str
    pairwise: bool
    full: Callable
    compact: Callable
    inputs: tuple[str, ...] = ()
    options: dict[str, Option] = field(default_factory=dict)
    mean: bool = False
    reads: Callable | None = None
    metric: str = "reward"

    def check_options(self, given: dict) -> dict:
        """The loss's options, checked, with their defaults filled in."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise TypeError(f"loss={self.name!r} takes the options {sorted(self.options)}, got {unknown}")
        return {key: checks.check_real(key, given.get(key, option.default), positive=option.positive)
                for key, option in self.options.items()}


LOSSES: dict[str, FusedLoss] = {}


def register(loss: FusedLoss) -> FusedLoss:
    """Makes ``loss`` available to ``linear_selective_loss(..., loss=loss.name)``; returns it."""
    if loss.name in LOSSES:
        raise ValueError(f"a loss named {loss.name!r} is registered already")
    clash = sorted(set(loss.inputs) & set(loss.options))
    if clash:
        raise ValueError(f"loss {loss.name!r}: {clash} named both as inputs and as options")
    LOSSES[loss.name] = loss
    return loss


def lookup(name: str) -> FusedLoss:
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
    return LOSSES[name]
