"""Triton kernel of token_scores: one program streams a block of rows through both heads."""

import triton
import triton.language as tl

from ..linear_logprobs.triton_kernels import precision_flags, row_logprobs, tile_configs


@triton.autotune(configs=tile_configs(), key=["V", "DA", "DB", "IEEE", "DOT_FP32"])
@triton.jit
def _token_scores_kernel(ha_ptr, wa_ptr, hb_ptr, wb_ptr, tgt_ptr, rows_ptr, out_ptr, n_rows, V, DA, DB,
                         stride_ha, stride_wa, stride_hb, stride_wb,
                         IEEE: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = i < n_rows
    rows = tl.load(rows_ptr + i, mask=ok, other=0)
    tgt = tl.load(tgt_ptr + rows, mask=ok, other=0)
    logp_a, _ = row_logprobs(ha_ptr, wa_ptr, wa_ptr, rows, ok, tgt, V, DA, stride_ha, stride_wa, 1.0, 1.0,
                             False, False, IEEE, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
    logp_b, _ = row_logprobs(hb_ptr, wb_ptr, wb_ptr, rows, ok, tgt, V, DB, stride_hb, stride_wb, 1.0, 1.0,
                             False, False, IEEE, DOT_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
    tl.store(out_ptr + rows, logp_a - logp_b, mask=ok)


def token_scores_into(hidden_a, weight_a, hidden_b, weight_b, targets, rows, out):
    """Writes logp_a - logp_b of ``rows`` into ``out`` [N]."""
    n_rows = rows.numel()
    if n_rows == 0:
        return
    _token_scores_kernel[lambda tile: (triton.cdiv(n_rows, tile["BLOCK_N"]),)](
        hidden_a, weight_a, hidden_b, weight_b, targets, rows, out, n_rows, weight_a.shape[0],
        weight_a.shape[1], weight_b.shape[1], hidden_a.stride(0), weight_a.stride(0), hidden_b.stride(0),
        weight_b.stride(0), **precision_flags(hidden_a.dtype))
