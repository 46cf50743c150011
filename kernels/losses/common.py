"""Pieces shared by the losses: input checks, per-segment token counts and means, and the Bradley-Terry pair
loss with its metrics. The loss files hold only their own math on top of these."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks
from ..segment_sum import segment_sum_unchecked
from ..utils import selected_bounds


def check_inputs(logps: torch.Tensor, cu_seqlens: torch.Tensor, *, mask: torch.Tensor | None = None,
                 **floats: torch.Tensor) -> int:
    """Checks logps [N], the optional bool ``mask`` [N], the other float [N] tensors and cu_seqlens; returns S."""
    checks.check_float("logps", logps, 1)
    n = logps.shape[0]
    for name, t in floats.items():
        checks.check_float(name, t, 1)
        checks.check_length(name, t, n)
    if mask is not None:
        checks.check_mask("mask", mask, n)
    num_segments = checks.check_cu_seqlens(cu_seqlens, n)
    checks.check_same_device(logps=logps, **floats, mask=mask, cu_seqlens=cu_seqlens)
    return num_segments


def token_counts(cu_seqlens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """int64 [S]: the tokens of each segment (selected ones when ``mask`` is given), all >= 1.

    A mean over no token is undefined and silently taking 0 would corrupt training, so a segment with
    none raises a ValueError naming cu_seqlens (empty segment) or mask (nothing selected).
    """
    cu = cu_seqlens.long()
    # Integer prefix sums are exact: counts need none of segment_sum's floating point.
    counts = cu.diff() if mask is None else selected_bounds(mask, cu_seqlens).diff()
    none = torch.nonzero(counts == 0)
    if none.numel():
        s = int(none[0])
        num_pairs = counts.shape[0] // 2
        where = f"segment {s} ({'chosen' if s < num_pairs else 'rejected'} response of pair {s % num_pairs})"
        if int(cu[s + 1]) == int(cu[s]):
            raise ValueError(f"cu_seqlens: {where} is empty; this loss takes a mean over its tokens")
        raise ValueError(f"mask selects no token of {where}; this loss takes a mean over the selected tokens")
    return counts


def segment_mean(values: torch.Tensor, cu_seqlens: torch.Tensor, counts: torch.Tensor, backend: str) -> torch.Tensor:
    """[S] sum of ``values`` over each segment divided by ``counts`` (from ``token_counts``); inputs checked,
    ``backend`` resolved."""
    sums = segment_sum_unchecked(values, cu_seqlens, backend)
    return sums / counts.to(sums.dtype)


def pair_loss(rewards: torch.Tensor, offset: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss over pairs laid out chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}.

    With ``margin = rewards[:P] - rewards[P:]``, returns ``mean(-logsigmoid(margin - offset))`` and the
    detached [P] metrics chosen_reward, rejected_reward, margin (before ``offset``) and accuracy
    (1.0 where chosen_reward > rejected_reward, else 0.0; a NaN reward counts as 0.0).
    """
    num_pairs = rewards.shape[0] // 2
    chosen, rejected = rewards[:num_pairs], rewards[num_pairs:]
    margin = chosen - rejected
    loss = -F.logsigmoid(margin - offset).mean()
    metrics = {
        "chosen_reward": chosen.detach(),
        "rejected_reward": rejected.detach(),
        "margin": margin.detach(),
        "accuracy": (chosen > rejected).to(rewards.dtype),
    }
    return loss, metrics
