"""Argument checks shared by the ops: each raises a ValueError or TypeError naming the argument, before any work."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}")


def check_length(name: str, t: torch.Tensor, n: int, what: str = "N") -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{what}] = [{n}], got {tuple(t.shape)}")


def check_targets(targets: torch.Tensor, n: int, vocab: int, ignore_index: int) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    check_length("targets", targets, n)
    if n == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bad.any():  # one host synchronisation
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {targets[bad][0].item()}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> int:
    """Checks the segment boundaries of a packed batch of ``n`` tokens; returns the number of segments."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must have shape [S+1] with S >= 0, got {tuple(cu_seqlens.shape)}")
    # One host synchronisation for the three facts.
    first, last, decreasing = torch.stack([cu_seqlens[0], cu_seqlens[-1],
                                           (cu_seqlens[1:] < cu_seqlens[:-1]).any().to(torch.int32)]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if last != n:
        raise ValueError(f"cu_seqlens must end at N={n}, got {last}")
    if decreasing:
        raise ValueError("cu_seqlens must be non-decreasing")
    return cu_seqlens.shape[0] - 1


def check_pairs(num_segments: int) -> int:
    """Pairwise losses lay out chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}; returns P."""
    if num_segments == 0:
        raise ValueError("cu_seqlens holds no segment: a loss over zero pairs is undefined")
    if num_segments % 2:
        raise ValueError(f"cu_seqlens must hold an even number of segments (chosen then rejected), got {num_segments}")
    return num_segments // 2


def check_mask(name: str, mask: torch.Tensor, n: int) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    check_length(name, mask, n)


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
