"""Triton kernels of linear_logprobs: a streaming forward (online log-sum-exp over vocabulary blocks) and a
backward that, one vocabulary slice at a time, recomputes the logits tiles into dL/dlogits, which two GEMMs
turn into the gradients.

Rows are addressed through an index vector, so callers pass only the rows that matter (targets not
ignored in the forward, non-zero upstream gradient in the backward) and the rest cost nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted

# The tiles the matmul kernels (here and in token_scores) are autotuned over, on the GPU that runs them, once
# per head shape and dtype. Each compiles for sm_80 and sm_90 with pipelined loads and no register spills
# (tests/compile_report.py, checked by tests/test_compile.py). The first is the tile measured on an H100
# (benchmarks/GPU-NOTES.md); Triton's interpreter runs it alone, as it has no timings to tune on.
TILES = [dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
         dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=4),
         dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3)]
# Vocabulary spans and slices are multiples of every tile's BLOCK_V.
SPAN_MULTIPLE = max(t["BLOCK_V"] for t in TILES)
# The kernels' options that select their code, part of every tuning key (with the dtypes of the tensors).
FLAGS = ["HAS_BIAS", "HAS_SOFTCAP", "IEEE", "DOT_FP32"]


def tile_config(tile: dict) -> triton.Config:
    return triton.Config({k: v for k, v in tile.items() if k.startswith("BLOCK_")}, num_warps=tile["num_warps"],
                         num_stages=tile["num_stages"])


def tile_configs() -> list:
    """The autotuner's configs: every tile on a GPU, the first alone under the interpreter."""
    return [tile_config(t) for t in (TILES[:1] if triton_interpreted() else TILES)]


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


@triton.autotune(configs=tile_configs(), key=["V", "D", *FLAGS])
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


@triton.autotune(configs=tile_configs(), key=["D", *FLAGS])
@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, rows_ptr, g_ptr, lse_ptr, dz_ptr, n_rows, v_start, v_end, D,
                        stride_h, stride_w, temperature, softcap,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One [rows, vocab] tile of dL/dz = g/T * (onehot - softmax) * dsoftcap over the vocabulary slice
    [v_start, v_end), recomputed from h and W and written into the slice buffer dz [n_rows, v_end - v_start]
    (row i of dz is hidden row rows[i], column j is vocabulary entry v_start + j)."""
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = i < n_rows
    rows = tl.load(rows_ptr + i, mask=ok, other=0)
    cols = v_start + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_end
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
    out = dz_ptr + i[:, None].to(tl.int64) * (v_end - v_start) + (cols - v_start)[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=ok[:, None] & col_ok[None, :])


# The backward's gradient-of-logits buffer: about this many bytes per vocabulary slice.
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
    """Columns per vocabulary split (a multiple of SPAN_MULTIPLE): as few splits as fill the device."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = INTERPRETER_PROGRAMS
    splits = max(1, min(triton.cdiv(vocab, SPAN_MULTIPLE), triton.cdiv(target, row_blocks)))
    return triton.cdiv(triton.cdiv(vocab, splits), SPAN_MULTIPLE) * SPAN_MULTIPLE


def forward_into(hidden, weight, targets, rows, bias, temperature, softcap, logp, lse):
    """Writes logp and lse of ``rows`` (an index vector) into the [N] outputs; other entries are left as they are."""
    n_rows = rows.numel()
    if n_rows == 0:
        return
    v = weight.shape[0]
    span = vocab_span(triton.cdiv(n_rows, TILES[0]["BLOCK_N"]), v, hidden.device)
    splits = triton.cdiv(v, span)
    part = torch.full((3, splits, n_rows), float("nan"), dtype=torch.float32, device=hidden.device)  # poisoned
    _forward_kernel[lambda tile: (triton.cdiv(n_rows, tile["BLOCK_N"]), splits)](
        hidden, weight, bias if bias is not None else weight, targets, rows, part,
        n_rows, v, weight.shape[1], hidden.stride(0), weight.stride(0), float(temperature), float(softcap or 1.0),
        span, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **precision_flags(hidden.dtype))
    x_t, m, s = part
    # Combine the splits: lse = M + log(sum_k s_k exp(m_k - M)); a nan in any split stays nan.
    top = m.amax(dim=0)
    top = torch.where(torch.isinf(top) & (top < 0), torch.zeros_like(top), top)
    row_lse = top + (s * torch.exp(m - top)).sum(dim=0).log()
    lse[rows] = row_lse
    logp[rows] = x_t.sum(dim=0) - row_lse


def backward(grad_logp, hidden, weight, targets, rows, lse, bias, temperature, softcap, need_hidden, need_weight, need_bias):
    """Gradients from the rows in ``rows``, a vocabulary slice at a time: a kernel writes dL/dlogits of every
    row over the slice (recomputing its logits tile by tile), then GEMMs take it to the slice's rows of
    dL/dweight, written once, and to its share of dL/dhidden, summed over the slices in fp32.

    Slicing the vocabulary, not the rows, keeps the workspace flat in V (the slice buffer, about
    GRAD_CHUNK_BYTES, and [rows, D] buffers) and gives the weight-gradient GEMM all rows as its inner dimension.
    Adding both gradients straight from each tile with atomics would cost O(N V D / block) atomic adds instead.
    """
    v, d = weight.shape
    dtype = hidden.dtype
    n = rows.numel()
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    grad_bias = torch.zeros_like(bias) if need_bias else None
    if n > 0:
        dot_dtype = torch.float32 if dot_fp32(dtype) else dtype
        span = GRAD_CHUNK_BYTES // (n * hidden.element_size()) // SPAN_MULTIPLE * SPAN_MULTIPLE
        span = min(v, max(SPAN_MULTIPLE, span))
        # Poisoned: an element the kernel fails to write turns the gradient into nan.
        dz_flat = torch.full((n * span,), float("nan"), dtype=dot_dtype, device=hidden.device)
        h = hidden.index_select(0, rows).to(dot_dtype) if need_weight else None
        slices = range(0, v, span)
        # One slice: its product is the hidden gradient; several: their products are summed in fp32.
        acc_h = torch.zeros(n, d, dtype=torch.float32, device=hidden.device) if need_hidden and len(slices) > 1 else None
        for v0 in slices:
            v1 = min(v0 + span, v)
            dz = dz_flat[:n * (v1 - v0)].view(n, v1 - v0)
            _grad_logits_kernel[lambda tile: (triton.cdiv(n, tile["BLOCK_N"]), triton.cdiv(v1 - v0, tile["BLOCK_V"]))](
                hidden, weight, bias if bias is not None else weight, targets, rows, grad_logp, lse, dz,
                n, v0, v1, d, hidden.stride(0), weight.stride(0), float(temperature), float(softcap or 1.0),
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **precision_flags(dtype))
            if need_weight:
                if dot_dtype == weight.dtype:
                    torch.mm(dz.T, h, out=grad_weight[v0:v1])
                else:
                    grad_weight[v0:v1] = dz.T @ h
            if need_hidden:
                w = weight[v0:v1].to(dot_dtype)
                if acc_h is None:
                    grad_hidden.index_copy_(0, rows, (dz @ w).to(dtype))
                elif dot_dtype == torch.float32:
                    acc_h.addmm_(dz, w)
                else:
                    acc_h += dz @ w
            if need_bias:
                grad_bias[v0:v1] = dz.sum(0, dtype=torch.float32)
        if acc_h is not None:
            grad_hidden.index_copy_(0, rows, acc_h.to(dtype))
    return grad_hidden, grad_weight, grad_bias
