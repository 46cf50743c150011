"""Peak memory of a piece of work on its device: what the comparison of methods reports.

On CUDA, the peak of tensors allocated by PyTorch. On CPU, the peak resident memory of the process
(VmHWM), reset first through /proc/self/clear_refs (Linux); elsewhere it cannot be reset and the
process's lifetime peak is reported.
"""

from __future__ import annotations

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib(device: torch.device) -> float | None:
    """The peak since ``reset_peak`` in MiB, or None where the platform does not tell."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib / 1024
