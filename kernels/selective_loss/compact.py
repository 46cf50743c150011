"""The compacted layout: only the selected tokens, in order, with their segment boundaries."""

import torch


def compact_boundaries(selected: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 [S+1]: where each segment starts and ends among the selected tokens (exact integer prefix sums)."""
    prefix = torch.zeros(selected.shape[0] + 1, dtype=torch.int64, device=selected.device)
    prefix[1:] = selected.cumsum(0)
    return prefix[cu_seqlens.long()]
