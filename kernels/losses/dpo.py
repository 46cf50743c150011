"""DPO's loss, and Selective-DPO's (arXiv 2507.07725) when a token mask is given."""

from __future__ import annotations

import torch

from .. import checks
from ..segment_sum import segment_sum_unchecked
from ..utils import acc_dtype
from . import common
from .spec import FusedLoss, Linear, Option, register


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, cu_seqlens: torch.Tensor, *, beta: float = 0.1,
             mask: torch.Tensor | None = None, backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean over pairs of -logsigmoid(beta * (d_chosen - d_rejected))``, d = sum of (logps - ref_logps).

    The sums run over all tokens of a response, or over the ``mask``-selected ones only (Selective-DPO
    applies the same mask to policy and reference). A response with no token (or none selected) has
    d = 0, which is well defined for a sum.

    Args:
        logps: [N] per-token log-probs of the policy (float; fp64 on the torch and naive backends).
        ref_logps: [N] per-token log-probs of the reference model (any float dtype; usually detached).
        cu_seqlens: int32 [2P+1]: segments chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}.
        beta: the KL strength (> 0). mask: optional [N] bool token selection.
        backend: "auto", "triton", "torch" or "naive", used for the per-segment sums.

    Returns:
        (loss, metrics): the 0-dim mean loss (float32, float64 for float64 logps), differentiable w.r.t.
        logps (and ref_logps), and detached [P] tensors "chosen_reward" and "rejected_reward" (beta * d),
        "margin" (chosen_reward - rejected_reward, exactly the sigmoid's argument) and "accuracy".
        A NaN or inf anywhere in logps or ref_logps, selected or not, makes the loss NaN.
    """
    num_segments = common.check_inputs(logps, cu_seqlens, mask=mask, ref_logps=ref_logps)
    checks.check_pairs(num_segments)
    options = DPO.check_options({"beta": beta})
    return dpo_full(logps, cu_seqlens, mask, checks.resolve("logps", logps, backend), ref_logps=ref_logps, **options)


def dpo_full(logps, cu_seqlens, mask, backend: str, *, ref_logps, beta: float):
    """``dpo_loss`` of checked inputs on a resolved backend."""
    acc = acc_dtype(logps.dtype)
    log_ratio = logps.to(acc) - ref_logps.to(acc)
    if mask is not None:
        log_ratio = log_ratio * mask
    return common.pair_loss(beta * segment_sum_unchecked(log_ratio, cu_seqlens, backend), 0.0)


def dpo_compact(counts, *, ref_logps, beta: float) -> Linear:
    """A response's reward: beta times the sum of its selected tokens' logp - ref_logp."""
    return Linear(scale=beta, shift=-ref_logps)


DPO = register(FusedLoss("dpo", pairwise=True, full=dpo_full, compact=dpo_compact, inputs=("ref_logps",),
                         options={"beta": Option(0.1, positive=True)}))
