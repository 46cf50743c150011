"""The memory-bound passes of one call: PyTorch ops (the CPU's) or Triton kernels (CUDA, and the interpreter),
behind one interface that records each pass's traffic in the ledger and skips the work in a dry run."""

from __future__ import annotations

import torch

from .. import ledger
from ..dtypes import acc_dtype
from . import passes_torch


class Passes:
    """``which``: "torch" or "triton". Each method's contract is in ``passes_torch``."""

    def __init__(self, which: str, temperature: float, softcap: float | None):
        if which == "triton":
            from . import passes_triton as impl
        else:
            impl = passes_torch
        self.which, self.impl, self.temperature, self.softcap = which, impl, float(temperature), softcap

    def target_logits(self, h, rows, w, bias, targets) -> torch.Tensor:
        """[n] z of rows ``rows`` of h at their targets (float32; float64 for float64 inputs)."""
        n, d = rows.numel(), h.shape[1]
        ledger.record_pass("target_logits", (h[:n], w[:n], rows, targets), (rows,))
        if not ledger.executing():
            return torch.zeros(n, dtype=acc_dtype(h.dtype), device=h.device)
        return self.impl.target_logits(h, rows, w, bias, targets, self.temperature, self.softcap)

    def merge_lse_(self, x, bias, m, s) -> None:
        ledger.record_pass("merge_lse", (x, m, s), (m, s))
        if ledger.executing():
            self.impl.merge_lse_(x, bias, m, s, self.temperature, self.softcap)

    def grad_logits_(self, x, bias, targets, v0, g, lse) -> None:
        ledger.record_pass("grad_logits", (x, g, lse, targets), (x,))
        if ledger.executing():
            self.impl.grad_logits_(x, bias, targets, v0, g, lse, self.temperature, self.softcap)
