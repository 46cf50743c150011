"""SimPO's loss: reference-free, length-normalised, with a target reward margin."""

from __future__ import annotations

import torch

from .. import checks
from . import common
from .spec import FusedLoss, Linear, Option, register


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
    options = SIMPO.check_options({"beta": beta, "gamma": gamma})
    return simpo_full(logps, cu_seqlens, mask, checks.resolve("logps", logps, backend), **options)


def simpo_full(logps, cu_seqlens, mask, backend: str, *, beta: float, gamma: float):
    """``simpo_loss`` of checked inputs on a resolved backend (a response without a (selected) token:
    ValueError)."""
    values = logps if mask is None else logps * mask
    mean = common.segment_mean(values, cu_seqlens, common.token_counts(cu_seqlens, mask), backend)
    return common.pair_loss(beta * mean, gamma)


def simpo_compact(counts, *, beta: float, gamma: float) -> Linear:
    """A response's reward: beta times the mean of its selected log-probs."""
    return Linear(scale=beta / counts, offset=gamma)


SIMPO = register(FusedLoss("simpo", pairwise=True, full=simpo_full, compact=simpo_compact, mean=True,
                           options={"beta": Option(2.0, positive=True), "gamma": Option(0.5)}))
