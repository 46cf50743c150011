"""segment_sum: the sum of a packed [N] tensor over each segment, the reduction under the pairwise losses."""

from __future__ import annotations

import torch

from .. import checks
from ..utils import acc_dtype, poisoned
from . import torch_ops
from .naive import segment_sum_naive


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Sum of ``values`` over each segment ``[cu_seqlens[s], cu_seqlens[s+1])``.

    Args:
        values: [N] float tensor (fp32, bf16, fp16; fp64 on the torch and naive backends).
        cu_seqlens: int32 [S+1] segment boundaries (0, non-decreasing, ending at N).
        backend: "auto", "triton", "torch" or "naive" (see ``selpo.kernels.backend``).

    Returns:
        [S] float32 sums (float64 for float64 values); an empty segment sums to 0, and a NaN token makes
        its own segment NaN, no other. Differentiable w.r.t. ``values``: each token receives its
        segment's gradient. The torch path accumulates in float64, the Triton path in fp32.
    """
    checks.check_float("values", values, 1)
    checks.check_same_device(values=values, cu_seqlens=cu_seqlens)
    checks.check_cu_seqlens(cu_seqlens, values.shape[0])
    return segment_sum_unchecked(values, cu_seqlens, checks.resolve("values", values, backend))


def segment_sum_unchecked(values: torch.Tensor, cu_seqlens: torch.Tensor, backend: str) -> torch.Tensor:
    """``segment_sum`` of inputs already checked, on a resolved backend: no host synchronisation."""
    if backend == "naive":
        return segment_sum_naive(values, cu_seqlens)
    return SegmentSum.apply(values, cu_seqlens, backend)


class SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, cu_seqlens, backend):
        values = values.contiguous()
        out_dtype = acc_dtype(values.dtype)
        if backend == "triton":
            from . import triton_kernels

            sums = poisoned((cu_seqlens.shape[0] - 1,), out_dtype, values.device)
            triton_kernels.sum_into(values, cu_seqlens, sums)
        else:
            sums = torch_ops.forward(values, cu_seqlens, out_dtype)
        ctx.save_for_backward(cu_seqlens)
        ctx.options = (values.shape[0], values.dtype, backend)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        (cu_seqlens,) = ctx.saved_tensors
        n, dtype, backend = ctx.options
        if backend == "triton":
            from . import triton_kernels

            grad = poisoned((n,), dtype, grad_sums.device)
            triton_kernels.broadcast_into(grad_sums.to(dtype).contiguous(), cu_seqlens, grad)
        else:
            grad = torch_ops.backward(grad_sums, cu_seqlens, n, dtype)
        return grad, None, None


__all__ = ["segment_sum", "segment_sum_naive", "segment_sum_unchecked", "SegmentSum"]
