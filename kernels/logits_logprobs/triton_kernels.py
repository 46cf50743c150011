"""Triton kernels of logits_logprobs: one program per row, streaming over vocabulary blocks.

The forward keeps an online log-sum-exp per lane of the block (one exponential per logit, no reduction inside
the loop) and combines the lanes at the end; it saves only the row's log-sum-exp. The backward reads each
logit once and writes its gradient once, possibly over the logit itself. Rows that need no work (ignored
target, or zero upstream gradient in the backward) read nothing: their loop bound is 0.

Logits are addressed as a contiguous [N, V] tensor with int64 row offsets (N x V may exceed 2**31).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _forward_kernel(x_ptr, tgt_ptr, logp_ptr, lse_ptr, V, ignore_index, temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    tgt = tl.load(tgt_ptr + row)
    n_cols = tl.where(tgt != ignore_index, V, 0)
    x_row = x_ptr + row.to(tl.int64) * V
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    x_t = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
        x_t += tl.where(cols == tgt, x, 0.0)
        # One of m and x is the new max, so exp(min - max) is the only exponential: with s the lane's sum of
        # exp(. - m), a new max rescales s by it and adds 1, an old max adds it. nan sticks in m and s.
        m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = tl.exp(tl.minimum(m, x, propagate_nan=tl.PropagateNan.ALL) - m_safe)
        s = tl.where(x > m, s * d + 1.0, s + d)
        m = m_new
    m_row = tl.max(m, axis=0)
    m_row = tl.where(m_row == float("-inf"), 0.0, m_row)
    # A +inf lane gives exp(inf - inf) = nan here, and an all -inf row lse = -inf, so logp = nan for both.
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    lse = tl.where(n_cols > 0, lse, 0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.sum(x_t, axis=0) - lse)


@triton.jit
def _backward_kernel(x_ptr, out_ptr, tgt_ptr, g_ptr, lse_ptr, V, ignore_index, temperature, BLOCK_V: tl.constexpr):
    """out[row] = g/T * (onehot(target) - exp(x/T - lse)); 0 for an ignored row or g == 0. out may be x."""
    row = tl.program_id(0)
    tgt = tl.load(tgt_ptr + row)
    g = tl.load(g_ptr + row)
    n_read = tl.where((tgt != ignore_index) & (g != 0.0), V, 0)
    lse = tl.load(lse_ptr + row)
    scale = g / temperature
    x_row = x_ptr + row.to(tl.int64) * V
    out_row = out_ptr + row.to(tl.int64) * V
    for v0 in range(0, n_read, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(x / temperature - lse)
        dx = scale * (tl.where(cols == tgt, 1.0, 0.0) - p)
        tl.store(out_row + cols, dx.to(out_ptr.dtype.element_ty), mask=ok)
    zeros = tl.zeros((BLOCK_V,), dtype=out_ptr.dtype.element_ty)
    for v0 in range(n_read, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        tl.store(out_row + cols, zeros, mask=cols < V)


MAX_BLOCK_V = 4096


def launch_config(vocab: int) -> dict:
    """Vocabulary block (a power of two, at most MAX_BLOCK_V) and warps: about 16 logits per thread."""
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    return dict(BLOCK_V=block, num_warps=max(1, min(8, block // 512)))


def forward_into(logits, targets, ignore_index, temperature, logp, lse):
    """Writes every entry of the fp32 [N] outputs: log-prob of the target and log-sum-exp (0 and 0 if ignored)."""
    n, v = logits.shape
    if n:
        _forward_kernel[(n,)](logits, targets, logp, lse, v, ignore_index, float(temperature), **launch_config(v))


def backward_into(grad_logp, logits, targets, lse, ignore_index, temperature, out):
    """Writes every element of ``out`` ([N, V], contiguous, the logits' dtype; may be ``logits`` itself)."""
    n, v = logits.shape
    if n:
        _backward_kernel[(n,)](logits, out, targets, grad_logp, lse, v, ignore_index, float(temperature),
                               **launch_config(v))
    return out
