"""Small shared helpers for the tests."""

import torch

# Absolute tolerance of a log-prob or loss computed from inputs of each dtype, against float64 math on
# the same (rounded) inputs. Half inputs round the logits to their own precision inside the GEMM.
TOL = {torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 8e-3, torch.float64: 1e-10}


def cu_seqlens(lengths, device=None):
    """int32 [S+1] boundaries of segments with the given lengths (on torch's default device unless given)."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    if lengths:
        out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return out
