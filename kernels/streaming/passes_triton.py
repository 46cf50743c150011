"""The memory-bound passes as Triton kernels: each reads a logits tile once (and the in-place gradient
writes it once), in the tile's own dtype, with fp32 math.

Same contract as ``passes_torch``: a tile ``x`` [r, w] (row stride ``x.stride(0)``) holds raw products for
vocabulary columns [v0, v0 + w); ``z = softcap(x + b) / T``. The passes stream a row's columns in blocks of
BLOCK_V, 16 values per thread in 16-byte loads: merge_lse one program per row, or a few per row along the
vocabulary when the rows are few (``vocab_split``), grad_logits one program per block.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..utils import poisoned

BLOCK_V = 2048
NUM_WARPS = 4
BLOCK_D = 1024
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# merge_lse's grid along the vocabulary. With one program per row, 512 rows of 4 warps fill a quarter of an
# H100's or H200's 132 x 64 warp slots, and a streaming pass wants bytes in flight: ~30 KB per SM at 4.8 TB/s
# and ~0.8 us of latency, where a program has one block (4 KB of bf16) in flight. So a tile of few rows is
# split along its columns into programs that fill the slots (PROGRAMS_PER_SM: 4-warp programs of 32 registers,
# the compile report's count), each streaming at least MIN_SPAN columns so that its reductions at the end stay
# a small share; a second launch folds their parts, in a fixed order (the sums do not depend on timing).
PROGRAMS_PER_SM = 16
MIN_SPAN = 4 * BLOCK_V
DEFAULT_SMS = 132  # an H100's or H200's, for CPU tensors (the interpreter, a dry run's model)
PARTS_ROWS = 64  # rows per program of the fold of a split's parts


@triton.jit
def _softcap(y, softcap):
    """softcap * tanh(y / softcap) = softcap - 2 softcap / (1 + e^(2y / softcap)): one exp2 and one fast
    division (2 ulp) per value; the scalars fold once per program."""
    return softcap - tl.fdiv(2.0 * softcap, 1.0 + tl.exp2(y * (2.0 * LOG2E / softcap)), ieee_rounding=False)


@triton.jit
def transform(x, b_ptr, cols, ok, temperature, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """softcap(x + b[cols]) / T in fp32."""
    z = x.to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = _softcap(z, softcap)
    return z / temperature


@triton.jit
def _target_logits_kernel(h_ptr, rows_ptr, w_ptr, b_ptr, tgt_ptr, out_ptr, D, stride_h, stride_w, temperature,
                          softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[i] = z of row rows[i] at its target tgt[i]: the fp32 dot product of the two rows, transformed."""
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    tgt = tl.load(tgt_ptr + i).to(tl.int64)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = d < D
        h = tl.load(h_ptr + row * stride_h + d, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + tgt * stride_w + d, mask=ok, other=0.0).to(tl.float32)
        acc += h * w
    x = tl.sum(acc, axis=0)
    tl.store(out_ptr + i, transform(x, b_ptr, tgt, True, temperature, softcap, HAS_BIAS, HAS_SOFTCAP))


@triton.jit
def _merge(m_a, s_a, m_b, s_b):
    """(max, sum of exp(z - max)) of two such pairs; -inf maxima (nothing seen) stay harmless, nan sticks."""
    m = tl.maximum(m_a, m_b)
    safe = tl.where(m == float("-inf"), 0.0, m)
    return m, s_a * tl.exp(m_a - safe) + s_b * tl.exp(m_b - safe)


@triton.jit
def _fold_block(x_row, cols, ok, b_ptr, M, S, scale, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Folds a block [GROUPS, VEC] of columns into each group's running max M and sum S of exp2(l - M), with
    l = z * log2(e) = softcap(x + b) * scale. z grows with x + b, so a group's max is taken on x + b (one max per
    element); then one fused multiply-add and one exp2 per element. ``ok``: the columns in the tile (a constant
    true mask on full blocks, which the compiler drops)."""
    y = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = tl.where(ok, y, float("-inf"))
    top = tl.max(y, axis=1)
    if HAS_SOFTCAP:  # softcap(-inf) is -softcap: the columns outside stay -inf, so that they add nothing
        y = tl.where(ok, _softcap(y, softcap), float("-inf"))
        top = _softcap(top, softcap)
    M_new = tl.maximum(M, top * scale)
    safe = tl.where(M_new == float("-inf"), 0.0, M_new)
    S = S * tl.exp2(M - safe) + tl.sum(tl.exp2(y * scale - safe[:, None]), axis=1)
    return M_new, S


@triton.jit
def _merge_lse_kernel(x_ptr, ld, W, span, b_ptr, m_ptr, s_ptr, temperature, softcap, HAS_BIAS: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """Folds columns [j * span, (j + 1) * span) of row i of the tile, j = program_id(1), into the row's running
    max m[i] and sum s[i] of exp(z - m); ``SPLIT``: m and s are the [rows, splits] parts of one launch instead,
    written whole, for ``_merge_parts_kernel`` to fold. A block is [BLOCK_V // VEC, VEC]: a row of VEC columns
    is one thread's 16-byte load, and its max stays in the thread. Full blocks carry no mask."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    x_row = x_ptr + i.to(tl.int64) * ld
    start = j * span
    stop = tl.minimum(W, start + span)
    full = start + (stop - start) // BLOCK_V * BLOCK_V
    GROUPS: tl.constexpr = BLOCK_V // VEC
    offs = tl.arange(0, GROUPS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    everywhere = tl.full((GROUPS, VEC), True, tl.int1)
    scale = LOG2E / temperature
    M = tl.full((GROUPS,), float("-inf"), dtype=tl.float32)
    S = tl.zeros((GROUPS,), dtype=tl.float32)
    for c0 in range(start, full, BLOCK_V):
        M, S = _fold_block(x_row, c0 + offs, everywhere, b_ptr, M, S, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
    if full < stop:
        M, S = _fold_block(x_row, full + offs, full + offs < stop, b_ptr, M, S, scale, softcap, HAS_BIAS,
                           HAS_SOFTCAP)
    top = tl.max(M, axis=0)
    safe = tl.where(top == float("-inf"), 0.0, top)
    m_row = top * LN2
    s_row = tl.sum(S * tl.exp2(M - safe), axis=0)
    if SPLIT:
        tl.store(m_ptr + i * tl.num_programs(1) + j, m_row)
        tl.store(s_ptr + i * tl.num_programs(1) + j, s_row)
    else:
        m_row, s_row = _merge(tl.load(m_ptr + i), tl.load(s_ptr + i), m_row, s_row)
        tl.store(m_ptr + i, m_row)
        tl.store(s_ptr + i, s_row)


@triton.jit
def _merge_parts_kernel(parts_ptr, m_ptr, s_ptr, R, P, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Folds the [2, R, P] parts of a split merge_lse (maxima, then sums) into m and s [R], in a fixed order."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < R
    idx = rows[:, None] * P + tl.arange(0, BLOCK_P)[None, :]
    ok = in_rows[:, None] & (tl.arange(0, BLOCK_P)[None, :] < P)
    part_m = tl.load(parts_ptr + idx, mask=ok, other=float("-inf"))
    part_s = tl.load(parts_ptr + R * P + idx, mask=ok, other=0.0)
    top = tl.max(part_m, axis=1)
    safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(part_s * tl.exp(part_m - safe[:, None]), axis=1)
    m, s = _merge(tl.load(m_ptr + rows, mask=in_rows), tl.load(s_ptr + rows, mask=in_rows), top, total)
    tl.store(m_ptr + rows, m, mask=in_rows)
    tl.store(s_ptr + rows, s, mask=in_rows)


@triton.jit
def _grad_logits_kernel(x_ptr, ld, W, v0, b_ptr, tgt_ptr, g_ptr, lse_ptr, temperature, softcap,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """x <- g/T * (onehot(target) - exp(z - lse)) * softcap'(x + b) over one block of one row, in place."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < W
    ptrs = x_ptr + i.to(tl.int64) * ld + cols
    z = transform(tl.load(ptrs, mask=ok, other=0.0), b_ptr, cols, ok, temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
    tgt = tl.load(tgt_ptr + i) - v0
    dz = tl.where(cols == tgt, 1.0, 0.0) - tl.exp(z - tl.load(lse_ptr + i))
    if HAS_SOFTCAP:
        tanh = z * temperature / softcap
        dz = dz * (1.0 - tanh * tanh)
    dz = dz * (tl.load(g_ptr + i) / temperature)
    tl.store(ptrs, dz.to(x_ptr.dtype.element_ty), mask=ok)


@functools.cache
def sm_count(device: torch.device) -> int:
    """SMs of the GPU ``device``; DEFAULT_SMS for any other device."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def vocab_split(rows: int, cols: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(programs per row, columns each, a multiple of BLOCK_V) of merge_lse on a tile [rows, cols]: as many
    programs as fill PROGRAMS_PER_SM per SM in one wave, at most one per MIN_SPAN columns; one program per row
    once the rows fill half of them. ``splits`` asks for that many instead."""
    if splits is None:
        splits = min(PROGRAMS_PER_SM * sm_count(torch.device(device)) // max(1, rows), cols // MIN_SPAN)
    span = BLOCK_V * max(1, triton.cdiv(triton.cdiv(cols, BLOCK_V), max(1, splits)))
    return max(1, triton.cdiv(cols, span)), span


def _flags(bias, softcap) -> dict:
    return dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None)


def target_logits(h, rows, w, bias, targets, temperature, softcap) -> torch.Tensor:
    n = rows.numel()
    out = poisoned((n,), torch.float32, h.device)
    if n:
        _target_logits_kernel[(n,)](h, rows, w, bias if bias is not None else w, targets, out, h.shape[1],
                                    h.stride(0), w.stride(0), float(temperature), float(softcap or 1.0),
                                    BLOCK_D=BLOCK_D, num_warps=NUM_WARPS, **_flags(bias, softcap))
    return out


def merge_lse_(x, bias, m, s, temperature, softcap, keep: bool = True) -> None:
    """x is only read, whatever ``keep``."""
    merge_lse_split_(x, bias, m, s, temperature, softcap)


# No fused form: the Triton passes are merge_lse_, then grad_logits_ (``Passes.logprobs_and_grad_``).
logprobs_and_grad_ = None


def merge_lse_split_(x, bias, m, s, temperature, softcap, splits: int | None = None) -> None:
    """merge_lse_ with ``splits`` programs per row (see ``vocab_split``; None: its choice). Split, each program
    writes its row part's (max, sum) and a second small launch folds them into m and s."""
    r, w = x.shape
    if not r:
        return
    splits, span = vocab_split(r, w, x.device, splits)
    parts = None if splits == 1 else torch.empty((2, r, splits), dtype=torch.float32, device=x.device)
    _merge_lse_kernel[(r, splits)](x, x.stride(0), w, span, bias if bias is not None else x,
                                   *((m, s) if parts is None else parts), float(temperature), float(softcap or 1.0),
                                   SPLIT=parts is not None, BLOCK_V=BLOCK_V, VEC=16 // x.element_size(),
                                   num_warps=NUM_WARPS, **_flags(bias, softcap))
    if parts is not None:
        _merge_parts_kernel[(triton.cdiv(r, PARTS_ROWS),)](parts, m, s, r, splits, BLOCK_R=PARTS_ROWS,
                                                           BLOCK_P=triton.next_power_of_2(splits))


def grad_logits_(x, bias, targets, v0, g, lse, temperature, softcap) -> None:
    if x.shape[0]:
        grid = (x.shape[0], triton.cdiv(x.shape[1], BLOCK_V))
        _grad_logits_kernel[grid](x, x.stride(0), x.shape[1], v0, bias if bias is not None else x, targets, g, lse,
                                  float(temperature), float(softcap or 1.0), BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
                                  **_flags(bias, softcap))
