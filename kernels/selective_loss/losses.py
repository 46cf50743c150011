"""The losses a selective loss can end in: options checked once at the public edge, and the loss called on a
full token layout (the naive reference, through the public loss functions) or on a chunk of compacted,
all-selected tokens (the fused path, through their unchecked internals: no host synchronisation per chunk)."""

from __future__ import annotations

import inspect

import torch

from ..losses import common, dpo_loss, sepo_loss, simpo_loss, weighted_nll
from ..losses.dpo import dpo_unchecked
from ..losses.sepo import sepo_from_counts
from ..losses.simpo import simpo_from_counts
from ..losses.weighted_likelihood import weighted_nll_unchecked

PAIRWISE = ("sepo", "dpo", "simpo")
LOSSES = PAIRWISE + ("weighted_nll",)
# Each loss's options, and whether each must be > 0 (else only finite); defaults are the loss function's own.
OPTIONS = {"sepo": (sepo_loss, {"gamma": True, "margin": False}), "dpo": (dpo_loss, {"beta": True}),
           "simpo": (simpo_loss, {"beta": True, "gamma": False}), "weighted_nll": (weighted_nll, {})}


def check_options(name: str, options: dict) -> dict:
    """The options of loss ``name``, checked, with the loss function's defaults filled in."""
    function, known = OPTIONS[name]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"loss={name!r} takes the options {sorted(known)}, got {unknown}")
    defaults = inspect.signature(function).parameters
    return {key: common.check_real(key, options.get(key, defaults[key].default), positive=positive)
            for key, positive in known.items()}


def apply_loss(name: str, logps: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor,
               ref_logps: torch.Tensor | None, weights: torch.Tensor | None, backend: str, options: dict):
    """(loss, metrics) of loss ``name`` over the tokens in ``mask``, through the public loss functions."""
    if name == "sepo":
        return sepo_loss(logps, mask, cu_seqlens, backend=backend, **options)
    if name == "dpo":
        return dpo_loss(logps, ref_logps, cu_seqlens, mask=mask, backend=backend, **options)
    if name == "simpo":
        return simpo_loss(logps, cu_seqlens, mask=mask, backend=backend, **options)
    return weighted_nll(logps, torch.where(mask, weights, 0.0), cu_seqlens, backend=backend, **options)


def selected_loss(name: str, logps: torch.Tensor, cu_seqlens: torch.Tensor, counts: torch.Tensor,
                  ref_logps: torch.Tensor | None, weights: torch.Tensor | None, which: str, options: dict):
    """(loss, metrics) of loss ``name`` over every token given (all selected), segments bounded by
    ``cu_seqlens`` and holding ``counts`` tokens each; inputs and ``options`` checked by the caller."""
    if name == "sepo":
        return sepo_from_counts(logps, torch.ones_like(logps, dtype=torch.bool), cu_seqlens, counts, which=which,
                                **options)
    if name == "dpo":
        return dpo_unchecked(logps, ref_logps, cu_seqlens, mask=None, which=which, **options)
    if name == "simpo":
        return simpo_from_counts(logps, cu_seqlens, counts, mask=None, which=which, **options)
    return weighted_nll_unchecked(logps, weights, cu_seqlens, which)
