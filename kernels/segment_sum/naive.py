"""Naive reference: a Python loop over segments. The test oracle and the benchmark baseline."""

from __future__ import annotations

import torch

from ..utils import acc_dtype


def segment_sum_naive(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[values[cu[s]:cu[s+1]].sum() for s]``, in float32 (float64 for float64 values); differentiable by autograd."""
    dtype = acc_dtype(values.dtype)
    bounds = cu_seqlens.tolist()
    sums = [values[a:b].to(dtype).sum() for a, b in zip(bounds[:-1], bounds[1:])]
    if not sums:
        return torch.zeros(0, dtype=dtype, device=values.device)
    return torch.stack(sums)
