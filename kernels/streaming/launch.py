"""The hot path's GEMMs and row copies: cuBLAS (or the CPU's BLAS) through torch, each recorded in the ledger.

GEMMs multiply in the inputs' dtype (fp32 accumulation inside the GEMM) and write into buffers they are
handed, so nothing is allocated per call. Under a dry run (``ledger.counting(dry_run=True)``) they record
and return.
"""

from __future__ import annotations

import functools

import torch

from .. import ledger
from ..utils import acc_dtype


def logits(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[r, c] = h[r] . w[c]: a tile of raw logits, in the inputs' dtype."""
    ledger.record_gemm("logits", h, w.T, out)
    if ledger.executing():
        torch.mm(h, w.T, out=out)
    return out


def grad_weight(dz: torch.Tensor, h: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (+)= dz.T @ h: a vocabulary slice's rows of dL/dweight, in the weight's dtype, or in fp32 for half
    inputs (the fused loss sums its chunks' products there; see ``grad_hidden``)."""
    ledger.record_gemm("grad_weight", dz.T, h, out, accumulate)
    if ledger.executing():
        _mm_into(dz.T, h, out, accumulate)


def grad_hidden(dz: torch.Tensor, w: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (+)= dz @ w: a slice's share of dL/dhidden. ``out`` may be fp32 for half inputs: cuBLAS then adds
    its fp32 result straight into it (``addmm`` with ``out_dtype``), elsewhere a half product is widened."""
    ledger.record_gemm("grad_hidden", dz, w, out, accumulate)
    if ledger.executing():
        _mm_into(dz, w, out, accumulate)


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (+)= a @ b, ``out`` in a's dtype or fp32 for half a and b."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.is_cuda and widening_addmm(out.device):
        torch.addmm(out, a, b, beta=1 if accumulate else 0, out_dtype=out.dtype, out=out)
    elif accumulate:
        out += a @ b
    else:
        out.copy_(a @ b)


@functools.cache
def widening_addmm(device: torch.device) -> bool:
    """Whether this torch adds a half-precision product straight into an fp32 output on ``device``
    (``addmm`` with ``out_dtype``, PyTorch 2.8 and later); tried once per device on 2 x 2 matrices."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        out = torch.ones(2, 2, dtype=torch.float32, device=device)
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        return bool((out == 3).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def gather_rows(t: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = t[rows]."""
    ledger.record_pass("gather_rows", (out, rows), (out,))
    if ledger.executing():
        torch.index_select(t, 0, rows, out=out)
    return out


def scatter_rows(src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    """out[rows] = src (cast to out's dtype); other rows untouched."""
    ledger.record_pass("scatter_rows", (src, rows), (src,))
    if ledger.executing():
        out.index_copy_(0, rows, src.to(out.dtype))


def cast(src: torch.Tensor, out: torch.Tensor) -> None:
    """out = src, rounded to out's dtype (an fp32 accumulator into a half gradient)."""
    ledger.record_pass("cast", (src,), (out,))
    if ledger.executing():
        out.copy_(src)


def column_sums(dz: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (+)= dz.sum(0), summed in fp32 (fp64 for fp64): a slice of dL/dbias."""
    ledger.record_pass("bias_grad", (dz,), (out,))
    if ledger.executing():
        sums = dz.sum(0, dtype=acc_dtype(dz.dtype))
        if accumulate:
            out += sums.to(out.dtype)
        else:
            out.copy_(sums)
