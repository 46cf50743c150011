"""The losses a selective loss can end in, called the same way on a full or a compacted token layout."""

from __future__ import annotations

import torch

from ..losses import dpo_loss, sepo_loss, simpo_loss, weighted_nll

PAIRWISE = ("sepo", "dpo", "simpo")
LOSSES = PAIRWISE + ("weighted_nll",)


def apply_loss(name: str, logps: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor,
               ref_logps: torch.Tensor | None, weights: torch.Tensor | None, backend: str, options: dict):
    """(loss, metrics) of loss ``name`` over the tokens in ``mask``."""
    if name == "sepo":
        return sepo_loss(logps, mask, cu_seqlens, backend=backend, **options)
    if name == "dpo":
        return dpo_loss(logps, ref_logps, cu_seqlens, mask=mask, backend=backend, **options)
    if name == "simpo":
        return simpo_loss(logps, cu_seqlens, mask=mask, backend=backend, **options)
    return weighted_nll(logps, torch.where(mask, weights, 0.0), cu_seqlens, backend=backend, **options)
