"""The dtype policy of the ops: what their math runs in."""

import torch


def shift_of(m: torch.Tensor) -> torch.Tensor:
    """A row maximum made safe to subtract: 0 where it is -inf (a row of only -inf logits), so exp(x - shift)
    stays 0 there instead of nan; nan and +inf are kept, so such a row stays nan."""
    return torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (the torch and naive backends' reference precision), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
