"""SePO's loss (arXiv 2408.13518): reference-free, contrastive over the mean log-prob of the selected tokens."""

from __future__ import annotations

import torch

from .. import checks
from . import common


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
    gamma = common.check_real("gamma", gamma, positive=True)
    margin = common.check_real("margin", margin)
    which = common.resolve(backend, logps)
    return sepo_from_counts(logps, mask, cu_seqlens, common.token_counts(cu_seqlens, mask), gamma, margin, which)


def sepo_from_counts(logps, mask, cu_seqlens, counts, gamma: float, margin: float, which: str):
    """``sepo_loss`` of checked inputs, given the selected tokens per segment (``counts``, all >= 1)."""
    u = common.segment_mean(logps * mask, cu_seqlens, counts, which)
    return common.pair_loss(gamma * u, margin)
