"""Triton kernels of segment_sum: one program per segment, walking over its tokens one block at a time.

The forward keeps a BLOCK-wide fp32 accumulator and reduces it once at the end, so a long segment is
summed as BLOCK interleaved partial sums (much smaller rounding error than one running sum). Masked
lanes load 0, so tokens of a neighbouring segment never enter a sum, and an empty segment stores 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _sum_kernel(v_ptr, cu_ptr, out_ptr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    start = tl.load(cu_ptr + s)
    end = tl.load(cu_ptr + s + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(v_ptr + idx, mask=idx < end, other=0.0).to(tl.float32)
    tl.store(out_ptr + s, tl.sum(acc, axis=0))


@triton.jit
def _broadcast_kernel(g_ptr, cu_ptr, out_ptr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    start = tl.load(cu_ptr + s)
    end = tl.load(cu_ptr + s + 1)
    g = tl.broadcast_to(tl.load(g_ptr + s), (BLOCK,))
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        tl.store(out_ptr + idx, g, mask=idx < end)


def sum_into(values: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor) -> None:
    """Writes the fp32 sum of every segment of the contiguous ``values`` into ``out`` [S]."""
    num_segments = cu_seqlens.shape[0] - 1
    if values.numel() == 0:  # no token: every segment is empty (and an empty CUDA tensor has no valid pointer)
        out.zero_()
    elif num_segments:
        _sum_kernel[(num_segments,)](values, cu_seqlens, out, BLOCK=BLOCK, num_warps=NUM_WARPS)


def broadcast_into(grad_sums: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor) -> None:
    """Writes ``grad_sums[s]`` into every token of segment s of ``out`` [N], both of one dtype (cast by the
    caller, once per segment, with torch's rounding)."""
    num_segments = cu_seqlens.shape[0] - 1
    if out.numel() and num_segments:
        _broadcast_kernel[(num_segments,)](grad_sums, cu_seqlens, out, BLOCK=BLOCK, num_warps=NUM_WARPS)
