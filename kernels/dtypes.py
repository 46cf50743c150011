"""The dtype policy of the ops: what their math runs in."""

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (the torch and naive backends' reference precision), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
