"""Triton kernel of topk_mask: an exact rank by counting, tiled over the segment.

A program takes a block of positions i of one segment and, looping over the segment in blocks of j,
counts the valid j that beat i (a better score, or an equal one at a lower position). Token i is
selected when it is valid and fewer than k tokens beat it. That is O(L^2) comparisons per segment of
length L, but needs no sort, treats -0.0 and 0.0 as equal and +-inf as ordinary values by plain float
comparison, and takes each segment's direction (largest or smallest) from a flag.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# An int8 output holds 0 or 1 once written; this value marks an element no program wrote.
UNWRITTEN = 2
BLOCK_I = 64
BLOCK_J = 64


@triton.jit
def _topk_mask_kernel(scores_ptr, valid_ptr, cu_ptr, k_ptr, largest_ptr, out_ptr,
                      COMPARE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(cu_ptr + seg)
    end = tl.load(cu_ptr + seg + 1)
    k = tl.load(k_ptr + seg)
    descending = tl.load(largest_ptr + seg) != 0
    i = start + tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_segment = i < end
    s_i = tl.load(scores_ptr + i, mask=in_segment, other=0.0).to(COMPARE)
    valid_i = tl.load(valid_ptr + i, mask=in_segment, other=0) != 0
    beaten_by = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for j0 in range(start, end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        in_range = j < end
        s_j = tl.load(scores_ptr + j, mask=in_range, other=0.0).to(COMPARE)
        valid_j = tl.load(valid_ptr + j, mask=in_range, other=0) != 0
        better = tl.where(descending, s_j[None, :] > s_i[:, None], s_j[None, :] < s_i[:, None])
        tie_before = (s_j[None, :] == s_i[:, None]) & (j[None, :] < i[:, None])
        beats = (better | tie_before) & valid_j[None, :]
        beaten_by += tl.sum(beats.to(tl.int32), axis=1)
    selected = valid_i & (beaten_by < k)
    tl.store(out_ptr + i, selected.to(tl.int8), mask=in_segment)


def topk_mask(scores, cu_seqlens, k, largest, valid):
    """bool [N]: the ``k[s]`` best valid tokens of each segment s; ``k`` int64 [S], ``largest`` bool [S], ``valid``
    bool [N]."""
    n, num_segments = scores.shape[0], largest.shape[0]
    out = torch.full((n,), UNWRITTEN, dtype=torch.int8, device=scores.device)
    max_len = int(cu_seqlens.diff().max()) if num_segments else 0
    if max_len:
        # Half scores widen exactly to fp32, so every dtype is compared in its own values.
        compare = tl.float64 if scores.dtype == torch.float64 else tl.float32
        grid = (num_segments, triton.cdiv(max_len, BLOCK_I))
        _topk_mask_kernel[grid](scores, valid.view(torch.uint8), cu_seqlens, k.to(torch.int32),
                                largest.view(torch.uint8), out, COMPARE=compare, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J)
    if bool((out == UNWRITTEN).any()):
        raise RuntimeError("topk_mask: the Triton kernel left output elements unwritten")
    return out.bool()
