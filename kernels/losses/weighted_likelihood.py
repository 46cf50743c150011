"""Reward-weighted likelihood (arXiv 2306.00398, step 4): the LM loss of token-level guidance."""

from __future__ import annotations

import torch

from .. import checks
from ..segment_sum import segment_sum_unchecked
from ..utils import acc_dtype
from . import common
from .spec import FusedLoss, Linear, register


def weighted_nll(logps: torch.Tensor, weights: torch.Tensor, cu_seqlens: torch.Tensor, *,
                 backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over sequences of ``-sum_t weights[t] * logps[t]``.

    The weights are used as given: the paper's per-sequence normalisation w_t = r_t / sum r is the
    caller's choice. Segments here are independent sequences, not pairs; an empty one has nll 0.

    Args:
        logps: [N] per-token log-probs of the policy (float; fp64 on the torch and naive backends).
        weights: [N] float token weights (any float dtype).
        cu_seqlens: int32 [S+1], S >= 1 sequences.
        backend: "auto", "triton", "torch" or "naive", used for the per-segment sums.

    Returns:
        (loss, metrics): the 0-dim mean nll (float32, float64 for float64 logps), differentiable w.r.t.
        logps (and weights), and the detached [S] per-sequence "nll". NaN in logps or weights gives NaN.
    """
    num_segments = common.check_inputs(logps, cu_seqlens, weights=weights)
    if num_segments == 0:
        raise ValueError("cu_seqlens holds no segment: a mean over zero sequences is undefined")
    return weighted_nll_full(logps, cu_seqlens, None, checks.resolve("logps", logps, backend), weights=weights)


def weighted_nll_full(logps, cu_seqlens, mask, backend: str, *, weights):
    """``weighted_nll`` of checked inputs on a resolved backend, over the ``mask``-selected tokens (all: None)."""
    acc = acc_dtype(logps.dtype)
    weights = weights.to(acc) if mask is None else torch.where(mask, weights.to(acc), 0.0)
    nll = -segment_sum_unchecked(weights * logps.to(acc), cu_seqlens, backend)
    return nll.mean(), {"nll": nll.detach()}


def weighted_nll_compact(counts, *, weights) -> Linear:
    """A sequence's nll: minus the sum of its selected tokens' weight * logp."""
    return Linear(scale=-1.0, slope=weights)


WEIGHTED_NLL = register(FusedLoss("weighted_nll", pairwise=False, full=weighted_nll_full,
                                  compact=weighted_nll_compact, inputs=("weights",), metric="nll",
                                  reads=lambda weights: weights != 0))
