"""Outputs are poisoned before a kernel writes them, so an element a kernel fails to write shows up as nan."""

import torch


def poisoned_unless(keep: torch.Tensor) -> torch.Tensor:
    """A float32 output shaped like ``keep``: nan where ``keep`` (a kernel must write those), 0 elsewhere."""
    return torch.where(keep, float("nan"), 0.0).to(torch.float32)
