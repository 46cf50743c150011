"""Triton kernels of linear_logprobs: a streaming forward (online log-sum-exp over vocabulary blocks) and a
tiled backward that recomputes each [rows, vocab] tile once and adds both gradients from it.

Rows are addressed through an index vector, so callers pass only the rows that matter (targets not
ignored in the forward, non-zero upstream gradient in the backward) and the rest cost nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_h, stride_w,
                temperature, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """x = softcap(h[rows] @ w[cols].T + b[cols]) / temperature as a [BLOCK_N, BLOCK_V] fp32 tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * (2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0)
    return acc / temperature


@triton.jit
def row_partials(h_ptr, w_ptr, b_ptr, rows, row_ok, tgt, v_start, v_end, D, stride_h, stride_w, temperature, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online log-sum-exp of a block of rows over vocabulary columns [v_start, v_end): returns
    (target logit if it lies in the range else 0, running max m, sum of exp(x - m))."""
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    x_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        x = logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, stride_h, stride_w, temperature, softcap,
                        HAS_BIAS, HAS_SOFTCAP, IEEE, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
        x = tl.where(col_ok[None, :], x, float("-inf"))
        x_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # exp(x - m) of a nan or +inf logit is nan, so such a row ends nan, never as a number.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    return x_t, m, s


@triton.jit
def row_logprobs(h_ptr, w_ptr, b_ptr, rows, row_ok, tgt, V, D, stride_h, stride_w, temperature, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """(logp of the target, log-sum-exp) of a block of rows, streaming over the whole vocabulary once."""
    x_t, m, s = row_partials(h_ptr, w_ptr, b_ptr, rows, row_ok, tgt, 0, V, D, stride_h, stride_w, temperature,
                             softcap, HAS_BIAS, HAS_SOFTCAP, IEEE, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
    lse = m + tl.log(s)
    return x_t - lse, lse


@triton.jit
def _forward_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, part_ptr, n_rows, V, D, stride_h, stride_w,
                    temperature, softcap, span,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, vocabulary split): writes that split's (target logit, max, sum) of each row
    into part [3, splits, n_rows]; the splits are combined on the host."""
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    ok = i < n_rows
    rows = tl.load(rows_ptr + i, mask=ok, other=0)
    tgt = tl.load(tgt_ptr + rows, mask=ok, other=0)
    v_start = split * span
    v_end = tl.minimum(v_start + span, V)
    x_t, m, s = row_partials(h_ptr, w_ptr, b_ptr, rows, ok, tgt, v_start, v_end, D, stride_h, stride_w,
                             temperature, softcap, HAS_BIAS, HAS_SOFTCAP, IEEE, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
    out = part_ptr + split.to(tl.int64) * n_rows + i
    plane = tl.num_programs(1).to(tl.int64) * n_rows
    tl.store(out, x_t, mask=ok)
    tl.store(out + plane, m, mask=ok)
    tl.store(out + 2 * plane, s, mask=ok)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, g_ptr, lse_ptr, dz_ptr, n_rows, V, D,
                        stride_h, stride_w, temperature, softcap,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One [rows, vocab] tile of dL/dz = g/T * (onehot - softmax) * dsoftcap, recomputed from h and W and
    written into the chunk buffer dz [n_rows, V] (row i of dz is hidden row rows[i])."""
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = i < n_rows
    rows = tl.load(rows_ptr + i, mask=ok, other=0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    tgt = tl.load(tgt_ptr + rows, mask=ok, other=0)
    g = tl.load(g_ptr + rows, mask=ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=ok, other=0.0)
    x = logits_tile(h_ptr, w_ptr, b_ptr, rows, ok, cols, col_ok, D, stride_h, stride_w, temperature, softcap,
                    HAS_BIAS, HAS_SOFTCAP, IEEE, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
    dz = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - tl.exp(x - lse[:, None])
    if HAS_SOFTCAP:
        tanh = x * temperature / softcap
        dz = dz * (1.0 - tanh * tanh)
    dz = dz * (g / temperature)[:, None]
    out = dz_ptr + i[:, None].to(tl.int64) * V + cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=ok[:, None] & col_ok[None, :])


# Chosen from the compile report (tests/compile_report.py): with 8 warps and a 32-wide D step the
# [128, 128] fp32 logits tile stays in registers (no stack spills) on sm_80 and sm_90.
FORWARD_BLOCKS = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3)
BACKWARD_BLOCKS = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3)
# The backward's gradient-of-logits buffer: about this many bytes per chunk of rows.
GRAD_CHUNK_BYTES = 1 << 28
# The forward splits the vocabulary until there are about this many programs per streaming multiprocessor
# (few rows, e.g. the selected tokens of a small batch, would otherwise leave most of the GPU idle).
PROGRAMS_PER_SM = 2
# Under the interpreter there is no GPU to fill: a fixed count still exercises the split path.
INTERPRETER_PROGRAMS = 4


def ieee(dtype: torch.dtype) -> bool:
    """fp32 inputs multiply in full fp32 unless torch allows TF32 (torch.set_float32_matmul_precision)."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def dot_fp32(dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter computes tl.dot of bfloat16 blocks wrongly (numpy has no bfloat16), so
    there the blocks are widened to fp32 first; compiled kernels multiply bfloat16 on tensor cores."""
    return dtype == torch.bfloat16 and triton_interpreted()


def precision_flags(dtype: torch.dtype) -> dict:
    return dict(IEEE=ieee(dtype), DOT_FP32=dot_fp32(dtype))


def vocab_span(row_blocks: int, vocab: int, device: torch.device) -> int:
    """Columns per vocabulary split (a multiple of BLOCK_V): as few splits as fill the device."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRETER_PROGRAMS
    block = FORWARD_BLOCKS["BLOCK_V"]
    splits = max(1, min(triton.cdiv(vocab, block), triton.cdiv(target, row_blocks)))
    return triton.cdiv(triton.cdiv(vocab, splits), block) * block


def forward_into(hidden, weight, targets, rows, bias, temperature, softcap, logp, lse):
    """Writes logp and lse of ``rows`` (an index vector) into the [N] outputs; other entries are left as they are."""
    n_rows = rows.numel()
    if n_rows == 0:
        return
    blocks = FORWARD_BLOCKS
    v = weight.shape[0]
    row_blocks = triton.cdiv(n_rows, blocks["BLOCK_N"])
    span = vocab_span(row_blocks, v, hidden.device)
    splits = triton.cdiv(v, span)
    part = torch.full((3, splits, n_rows), float("nan"), dtype=torch.float32, device=hidden.device)  # poisoned
    _forward_kernel[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else weight, targets, rows, part,
        n_rows, v, weight.shape[1], hidden.stride(0), weight.stride(0), float(temperature), float(softcap or 1.0),
        span, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **precision_flags(hidden.dtype), **blocks)
    x_t, m, s = part
    # Combine the splits: lse = M + log(sum_k s_k exp(m_k - M)); a nan in any split stays nan.
    top = m.amax(dim=0)
    top = torch.where(torch.isinf(top) & (top < 0), torch.zeros_like(top), top)
    row_lse = top + (s * torch.exp(m - top)).sum(dim=0).log()
    lse[rows] = row_lse
    logp[rows] = x_t.sum(dim=0) - row_lse


def backward(grad_logp, hidden, weight, targets, rows, lse, bias, temperature, softcap, need_hidden, need_weight, need_bias):
    """Gradients from the rows in ``rows``, a chunk at a time: a kernel writes the chunk's dL/dlogits
    (recomputing its logits tile by tile), then two GEMMs take it to dL/dhidden and dL/dweight.

    Adding both gradients straight from each tile with atomics would cost O(N V D / block) atomic adds;
    the chunk buffer ([chunk, V] in the input dtype, GRAD_CHUNK_BYTES) lets the vendor GEMMs do it instead.
    """
    v = weight.shape[0]
    dtype = hidden.dtype
    acc = torch.float32
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    # fp32 weights accumulate in place; half ones in an fp32 buffer, widened chunk by chunk.
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(v, dtype=acc, device=weight.device) if need_bias else None
    step = max(BACKWARD_BLOCKS["BLOCK_N"], GRAD_CHUNK_BYTES // (v * hidden.element_size()))
    dot_dtype = torch.float32 if dot_fp32(dtype) else dtype
    # Poisoned: an element the kernel fails to write turns the gradient into nan.
    dz_all = torch.full((min(step, rows.numel()), v), float("nan"), dtype=dot_dtype, device=hidden.device)
    w = weight.to(dot_dtype)
    for idx in rows.split(step):
        dz = dz_all[:idx.numel()]
        blocks = BACKWARD_BLOCKS
        grid = (triton.cdiv(idx.numel(), blocks["BLOCK_N"]), triton.cdiv(v, blocks["BLOCK_V"]))
        _grad_logits_kernel[grid](
            hidden, weight, bias if bias is not None else weight, targets, idx, grad_logp, lse, dz,
            idx.numel(), v, weight.shape[1], hidden.stride(0), weight.stride(0), float(temperature),
            float(softcap or 1.0), HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            **precision_flags(dtype), **blocks)
        h = hidden.index_select(0, idx).to(dot_dtype)
        if need_hidden:
            grad_hidden.index_copy_(0, idx, (dz @ w).to(dtype))
        if need_weight:
            if dot_dtype == acc:
                grad_weight.addmm_(dz.T, h)
            else:
                grad_weight += (dz.T @ h).to(acc)
        if need_bias:
            grad_bias += dz.sum(0, dtype=acc)
    return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))
