"""The memory-bound passes of one call: PyTorch ops (the CPU's) or Triton kernels (CUDA, and the interpreter),
behind one interface that records each pass's traffic in the ledger and skips the work in a dry run."""

from __future__ import annotations

import torch

from .. import ledger
from ..utils import acc_dtype, shift_of
from . import passes_torch


def finish_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """lse = m + log(s); a row of only -inf logits gets -inf (so its log-prob is nan, as log_softmax gives)."""
    return shift_of(m) + s.log()


class Passes:
    """``backend``: "torch" or "triton". Each method's contract is in ``passes_torch``."""

    def __init__(self, backend: str, temperature: float, softcap: float | None):
        if backend == "triton":
            from . import passes_triton as impl
        else:
            impl = passes_torch
        self.impl, self.temperature, self.softcap = impl, float(temperature), softcap

    def target_logits(self, h, rows, w, bias, targets) -> torch.Tensor:
        """[n] z of rows ``rows`` of h at their targets (float32; float64 for float64 inputs)."""
        n = rows.numel()
        ledger.record_pass("target_logits", (h[:n], w[:n], rows, targets), (rows,))
        if not ledger.executing():
            return ledger.dry_input((n,), acc_dtype(h.dtype), h.device)
        return self.impl.target_logits(h, rows, w, bias, targets, self.temperature, self.softcap)

    def record_merge_lse(self, x, m, s) -> None:
        """merge_lse's launches: one, or for a Triton tile of few rows split along the vocabulary
        (``passes_triton.vocab_split``), one writing each program's (max, sum) and one folding them."""
        splits = self.impl.vocab_split(*x.shape, x.device)[0] if x.shape[0] else 1
        if splits == 1:
            ledger.record_pass("merge_lse", (x, m, s), (m, s))
        else:
            parts = ledger.dry_input((2, x.shape[0], splits), torch.float32, "meta")  # their bytes, unallocated
            ledger.record_pass("merge_lse", (x,), (parts,))
            ledger.record_pass("merge_lse_parts", (parts, m, s), (m, s))

    def merge_lse_(self, x, bias, m, s, keep: bool = True) -> None:
        """Folds the tile into the running max ``m`` and sum ``s``; ``keep=False``: x may be overwritten."""
        self.record_merge_lse(x, m, s)
        if ledger.executing():
            self.impl.merge_lse_(x, bias, m, s, self.temperature, self.softcap, keep)

    def logprobs_and_grad_(self, x, bias, targets, x_t, loss_grad, combine=None) -> torch.Tensor:
        """For a tile spanning the whole vocabulary (or this process's shard of it): each row's lse,
        ``g = loss_grad(x_t - lse)`` (the loss's gradient w.r.t. the rows' log-probs, or None for none), then
        x <- dL/dx in place. Returns lse. ``combine(m, s, x_t) -> (lse, x_t)`` makes them the whole
        vocabulary's from a shard's (``shard.VocabShard.combine``).

        The same two passes as ``merge_lse_`` and ``grad_logits_``; a backend with a fused form (PyTorch ops: four,
        exp(z - max) staying in x in between) runs it when the math needs no softcap, no widening and no
        combining."""
        r, acc = x.shape[0], acc_dtype(x.dtype)
        fused = self.impl.logprobs_and_grad_
        fast = (ledger.executing() and fused is not None and self.softcap is None and x.dtype == acc
                and combine is None)
        m = torch.full((r,), float("-inf"), dtype=acc, device=x.device)
        s = torch.zeros_like(m)
        self.record_merge_lse(x, m, s)
        if fast:
            lse, g = fused(x, bias, targets, x_t, loss_grad, self.temperature)
        else:
            if ledger.executing():
                self.impl.merge_lse_(x, bias, m, s, self.temperature, self.softcap)
            lse, x_t = (finish_lse(m, s), x_t) if combine is None else combine(m, s, x_t)
            g = loss_grad(x_t - lse)
        if g is not None:
            ledger.record_pass("grad_logits", (x, g, lse, targets), (x,))
            if ledger.executing() and not fast:
                self.impl.grad_logits_(x, bias, targets, 0, g, lse, self.temperature, self.softcap)
        return lse

    def grad_logits_(self, x, bias, targets, v0, g, lse) -> None:
        ledger.record_pass("grad_logits", (x, g, lse, targets), (x,))
        if ledger.executing():
            self.impl.grad_logits_(x, bias, targets, v0, g, lse, self.temperature, self.softcap)
