"""The memory-bound passes as Triton kernels: each reads a logits tile once (and the in-place gradient
writes it once), in the tile's own dtype, with fp32 math.

Same contract as ``passes_torch``: a tile ``x`` [r, w] (row stride ``x.stride(0)``) holds raw products for
vocabulary columns [v0, v0 + w); ``z = softcap(x + b) / T``. The per-row passes run one program per row
and stream its columns in blocks of BLOCK_V, 16 values per thread (16-byte loads in bf16, two in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 2048
NUM_WARPS = 4
BLOCK_D = 1024


@triton.jit
def transform(x, b_ptr, cols, ok, temperature, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """softcap(x + b[cols]) / T in fp32."""
    z = x.to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
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
def _merge_lse_kernel(x_ptr, ld, W, b_ptr, m_ptr, s_ptr, temperature, softcap,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Folds row i of the tile into its running max m[i] and sum s[i] of exp(z - m)."""
    i = tl.program_id(0)
    x_row = x_ptr + i.to(tl.int64) * ld
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for c0 in range(0, W, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        ok = cols < W
        z = transform(tl.load(x_row + cols, mask=ok, other=0.0), b_ptr, cols, ok, temperature, softcap,
                      HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(ok, z, float("-inf"))
        # Per lane, one of m and z is the new max, so exp(min - max) is the only exponential. nan sticks.
        m_new = tl.maximum(m, z, propagate_nan=tl.PropagateNan.ALL)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = tl.exp(tl.minimum(m, z, propagate_nan=tl.PropagateNan.ALL) - m_safe)
        s = tl.where(z > m, s * d + 1.0, s + d)
        m = m_new
    m_old = tl.load(m_ptr + i)
    s_old = tl.load(s_ptr + i)
    m_row = tl.maximum(tl.max(m, axis=0), m_old)
    m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    s_row = s_old * tl.exp(m_old - m_row_safe) + tl.sum(s * tl.exp(m - m_row_safe), axis=0)
    tl.store(m_ptr + i, m_row)
    tl.store(s_ptr + i, s_row)


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


def _flags(bias, softcap) -> dict:
    return dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None)


def target_logits(h, rows, w, bias, targets, temperature, softcap) -> torch.Tensor:
    n = rows.numel()
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=h.device)  # poisoned
    if n:
        _target_logits_kernel[(n,)](h, rows, w, bias if bias is not None else w, targets, out, h.shape[1],
                                    h.stride(0), w.stride(0), float(temperature), float(softcap or 1.0),
                                    BLOCK_D=BLOCK_D, num_warps=NUM_WARPS, **_flags(bias, softcap))
    return out


def merge_lse_(x, bias, m, s, temperature, softcap) -> None:
    if x.shape[0]:
        _merge_lse_kernel[(x.shape[0],)](x, x.stride(0), x.shape[1], bias if bias is not None else x, m, s,
                                         float(temperature), float(softcap or 1.0), BLOCK_V=BLOCK_V,
                                         num_warps=NUM_WARPS, **_flags(bias, softcap))


def grad_logits_(x, bias, targets, v0, g, lse, temperature, softcap) -> None:
    if x.shape[0]:
        grid = (x.shape[0], triton.cdiv(x.shape[1], BLOCK_V))
        _grad_logits_kernel[grid](x, x.stride(0), x.shape[1], v0, bias if bias is not None else x, targets, g, lse,
                                  float(temperature), float(softcap or 1.0), BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
                                  **_flags(bias, softcap))
