"""SePO's loss (arXiv 2408.13518): reference-free, contrastive over the mean log-prob of the selected tokens."""

from __future__ import annotations

import torch

from .. import checks
from . import common
from .spec import FusedLoss, Linear, Option, register


def sepo_loss(logps: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, *, gamma: float = 1.0,
              margin: float = 0.0, backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean over pairs of -logsigmoid(gamma * (u_chosen - u_rejected) - margin)``.

    ``u`` of a response is the mean of its selected log-probs (``mask``), so the reward is ``gamma * u``.
    The released SePO code uses gamma = 1 and margin = 0, a SimPO-shaped loss on the selected tokens.

    Args:
        logps: [N] per-token log-probs of the policy (float; fp64 on the torch and naive backends).
        mask: [N] bool, the selected tokens. Every response must have at least one, else ValueError.
        cu_seqlens: int32 [2P+1]: segments chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}.
        gamma: reward scale (> 0). margin: target reward margin (finite).
        backend: "auto", "triton", "torch" or "naive", used for the per-segment sums.

    Returns:
        (loss, metrics): the 0-dim mean loss (float32, float64 for float64 logps), differentiable w.r.t.
        logps, and detached [P] tensors "chosen_reward" and "rejected_reward" (gamma * u), "margin"
        (chosen_reward - rejected_reward, before ``margin`` is subtracted) and "accuracy". A NaN or inf
        anywhere in logps, selected or not, makes the loss NaN: it means the model is broken.
    """
    if mask is None:
        raise TypeError("mask must be a torch.Tensor (the selected tokens), got None")
    num_segments = common.check_inputs(logps, cu_seqlens, mask=mask)
    checks.check_pairs(num_segments)
    options = SEPO.check_options({"gamma": gamma, "margin": margin})
    return sepo_full(logps, cu_seqlens, mask, checks.resolve("logps", logps, backend), **options)


def sepo_full(logps, cu_seqlens, mask, backend: str, *, gamma: float, margin: float):
    """``sepo_loss`` of checked inputs on a resolved backend (a response without a selected token: ValueError)."""
    u = common.segment_mean(logps * mask, cu_seqlens, common.token_counts(cu_seqlens, mask), backend)
    return common.pair_loss(gamma * u, margin)


def sepo_compact(counts, *, gamma: float, margin: float) -> Linear:
    """A response's reward: gamma times the mean of its selected log-probs."""
    return Linear(scale=gamma / counts, offset=margin)


SEPO = register(FusedLoss("sepo", pairwise=True, full=sepo_full, compact=sepo_compact, mean=True,
                          options={"gamma": Option(1.0, positive=True), "margin": Option(0.0)}))
