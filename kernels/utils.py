"""Helpers the ops share: the dtype their math runs in, the layouts their kernels need, outputs poisoned before a
kernel writes them, and counts of selected tokens per segment."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (the torch and naive backends' reference precision), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def shift_of(m: torch.Tensor) -> torch.Tensor:
    """A row maximum made safe to subtract: 0 where it is -inf (a row of only -inf logits), so exp(x - shift)
    stays 0 there instead of nan; nan and +inf are kept, so such a row stays nan."""
    return torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)


def unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with its last dimension contiguous (what the GEMMs and kernels need), copied only if it is not."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def poisoned(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output filled with nan before a kernel writes it: an element the kernel fails to write reads as nan,
    never as a number."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def selected_bounds(mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 [S+1]: where each segment starts and ends among the tokens ``mask`` [N] keeps (exact integer prefix
    sums); its ``diff()`` is the kept tokens of each segment."""
    prefix = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    prefix[1:] = mask.cumsum(0)
    return prefix[cu_seqlens.long()]
