"""The PyTorch path, the default on CPU: vectorized, with no loop over the segments.

The forward scatter-adds every token into its segment (``index_add_`` with segment ids from
``repeat_interleave``), accumulating in float64. The alternative, a float64 ``cumsum`` followed by a
difference at the boundaries, is not used: one NaN or inf token would turn every later prefix, hence
every later segment, into NaN (inf - inf), and a segment late in a long batch would be the difference of
two large prefixes, losing digits relative to its own sum. The scatter keeps each segment's sum
independent of the others, exact up to float64 rounding of that segment alone.
"""

from __future__ import annotations

import torch


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [N]: the segment of each token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.arange(lengths.shape[0], device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths, output_size=n)


def forward(values: torch.Tensor, cu_seqlens: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[S] sums; empty segments give 0."""
    num_segments = cu_seqlens.shape[0] - 1
    acc = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    acc.index_add_(0, segment_ids(cu_seqlens, values.shape[0]), values.to(torch.float64))
    return acc.to(out_dtype)


def backward(grad_sums: torch.Tensor, cu_seqlens: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[N] gradient w.r.t. the values: each token gets its segment's gradient."""
    return grad_sums.index_select(0, segment_ids(cu_seqlens, n)).to(dtype)
