"""topk_mask: which tokens of each segment a selective loss keeps (the top ``ratio`` by score, or given counts)."""

from __future__ import annotations

import numbers

import torch

from .. import checks
from ..backend import resolve_backend
from ..utils import selected_bounds
from . import torch_ops
from .counts import select_counts
from .naive import topk_mask_naive


def topk_mask(scores: torch.Tensor, cu_seqlens: torch.Tensor, ratio: float | None = None, *,
              counts: torch.Tensor | None = None, largest: bool | torch.Tensor = True,
              valid: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Marks the ``k = max(1, floor(ratio * n_valid))`` best valid tokens of each segment, or ``counts[s]`` of them.

    "Best" is the largest score, or the smallest where ``largest`` is False; equal scores go to the
    lower position, -0.0 equals 0.0 and +-inf are ordinary values. Scores are compared in their own
    dtype, never rounded. k is computed once for every backend, from ``ratio`` by ``counts.select_counts``
    (which explains how ``floor`` is kept exact, e.g. ratio=0.3 of 10 tokens selects 3), or taken from
    ``counts`` for a caller whose rule counts otherwise (e.g. a released code's float arithmetic).

    Args:
        scores: [N] per-token scores (fp32, bf16, fp16 or fp64).
        cu_seqlens: int32 [S+1] segment boundaries.
        ratio: the fraction of each segment's valid tokens to select, in (0, 1].
        counts: instead of ``ratio``, an int32 or int64 tensor [S]: how many tokens each segment selects,
            each in [0, its number of valid tokens].
        largest: select the largest scores (True) or the smallest (False); a bool tensor [S] chooses per
            segment (e.g. largest for chosen responses, smallest for rejected ones).
        valid: optional bool [N]; only valid tokens count and can be selected (default: all). A segment
            without a valid token selects nothing.
        backend: "auto", "triton", "torch" or "naive" (see ``selpo.kernels.backend``).

    Returns:
        bool [N] mask, on the device of ``scores``.

    Raises:
        ValueError: a valid token's score is NaN (a mask cannot be NaN, and no rank of NaN is right).
    """
    checks.check_float("scores", scores, 1)
    n = scores.shape[0]
    num_segments = checks.check_cu_seqlens(cu_seqlens, n)
    if valid is not None:
        checks.check_mask("valid", valid, n)
    if isinstance(largest, torch.Tensor):
        if largest.dtype != torch.bool:
            raise TypeError(f"largest must be a bool or a bool tensor [S], got a {largest.dtype} tensor")
        checks.check_length("largest", largest, num_segments, "S")
    elif not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool or a bool tensor [S], got {type(largest).__name__}")
    if (ratio is None) == (counts is None):
        raise TypeError("topk_mask takes exactly one of ratio and counts, got "
                        f"{'both' if counts is not None else 'neither'}")
    if counts is not None:
        if not isinstance(counts, torch.Tensor) or counts.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"counts must be an int32 or int64 tensor [S], got "
                            f"{counts.dtype if isinstance(counts, torch.Tensor) else type(counts).__name__}")
        checks.check_length("counts", counts, num_segments, "S")
    elif not isinstance(ratio, numbers.Real) or isinstance(ratio, bool):
        raise TypeError(f"ratio must be a real number, got {type(ratio).__name__}")
    elif not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    checks.check_same_device(scores=scores, cu_seqlens=cu_seqlens, valid=valid, counts=counts,
                             largest=largest if isinstance(largest, torch.Tensor) else None)
    backend = resolve_backend(backend, scores.device)
    valid = torch.ones(n, dtype=torch.bool, device=scores.device) if valid is None else valid.contiguous()
    nan_at = torch.nonzero(torch.isnan(scores) & valid)
    if nan_at.numel():
        raise ValueError(f"scores must not be NaN at a valid token; found NaN at position {int(nan_at[0])}")
    n_valid = selected_bounds(valid, cu_seqlens).diff()
    if counts is None:
        k = select_counts(ratio, n_valid)
    else:
        k = counts.long()
        bad = torch.nonzero((k < 0) | (k > n_valid))
        if bad.numel():
            s = int(bad[0])
            raise ValueError(f"counts[{s}] = {int(k[s])} must lie in [0, {int(n_valid[s])}], the number of valid "
                             f"tokens of segment {s}")
    if not isinstance(largest, torch.Tensor):
        largest = torch.full((num_segments,), largest, dtype=torch.bool, device=scores.device)
    args = (scores.contiguous(), cu_seqlens.contiguous(), k, largest.contiguous(), valid)
    if backend == "naive":
        return topk_mask_naive(*args)
    if backend == "triton":
        from . import triton_kernels

        return triton_kernels.topk_mask(*args)
    return torch_ops.topk_mask(*args)


__all__ = ["topk_mask", "topk_mask_naive"]
