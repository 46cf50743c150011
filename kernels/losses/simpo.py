"""SimPO's loss: reference-free, length-normalised, with a target reward margin."""

from __future__ import annotations

import torch

from .. import checks
from . import common


def simpo_loss(logps: torch.Tensor, cu_seqlens: torch.Tensor, *, beta: float = 2.0, gamma: float = 0.5,
               mask: torch.Tensor | None = None, backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean over pairs of -logsigmoid(beta * mean_chosen - beta * mean_rejected - gamma)``.

    ``mean`` is the mean log-prob over a response's tokens, or over its ``mask``-selected ones. Every
    response needs at least one such token, else ValueError (a mean over nothing is undefined).

    Args:
        logps: [N] per-token log-probs of the policy (float; fp64 on the torch and naive backends).
        cu_seqlens: int32 [2P+1]: segments chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}.
        beta: reward scale (> 0). gamma: target reward margin (finite).
        mask: optional [N] bool token selection.
        backend: "auto", "triton", "torch" or "naive", used for the per-segment sums.

    Returns:
        (loss, metrics): the 0-dim mean loss (float32, float64 for float64 logps), differentiable w.r.t.
        logps, and detached [P] tensors "chosen_reward" and "rejected_reward" (beta * mean), "margin"
        (chosen_reward - rejected_reward, before gamma is subtracted) and "accuracy". A NaN or inf
        anywhere in logps (selected or not, when masked) makes the loss NaN.
    """
    num_segments = common.check_inputs(logps, cu_seqlens, mask=mask)
    checks.check_pairs(num_segments)
    beta = common.check_real("beta", beta, positive=True)
    gamma = common.check_real("gamma", gamma)
    which = common.resolve(backend, logps)
    return simpo_from_counts(logps, cu_seqlens, common.token_counts(cu_seqlens, mask), beta, gamma, mask, which)


def simpo_from_counts(logps, cu_seqlens, counts, beta: float, gamma: float, mask, which: str):
    """``simpo_loss`` of checked inputs, given the (selected) tokens per segment (``counts``, all >= 1)."""
    values = logps if mask is None else logps * mask
    return common.pair_loss(beta * common.segment_mean(values, cu_seqlens, counts, which), gamma)
