"""Argument checks shared by the ops: each raises a ValueError or TypeError naming the argument, before any work."""

from __future__ import annotations

import math
import numbers

import torch

from .backend import resolve_backend
from .streaming.shard import split_head

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


def check_real(name: str, value, *, positive: bool = False) -> float:
    """A finite Python/NumPy real (> 0 when ``positive``), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def resolve(name: str, t: torch.Tensor, backend: str, shard=None) -> str:
    """The concrete backend for the op's input ``t`` (named ``name``): Triton's kernels take no float64, and the
    naive reference builds full logits on one process, so it takes no vocabulary ``shard``."""
    backend = resolve_backend(backend, t.device)
    if backend == "naive" and shard is not None:
        raise ValueError("process_group: the naive backend builds full logits on one process; use torch or triton")
    if backend == "triton" and t.dtype == torch.float64:
        raise TypeError(f"{name}: the triton backend takes float32, bfloat16 or float16, got float64")
    return backend


def check_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None,
               ignore_index: int, temperature: float, softcap: float | None, process_group):
    """Checks the arguments of a linear head (hidden [N, D], weight [V, D], bias [V], targets [N], temperature,
    softcap); returns (this process's rows of the weight, its ``VocabShard`` or None: ``shard.split_head``)."""
    check_float("hidden", hidden, 2)
    check_float("weight", weight, 2)
    weight, shard = split_head(weight, process_group)
    n, d = hidden.shape
    if weight.shape[1] != d:
        raise ValueError(f"weight must have shape [V, D={d}], got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if bias is not None:
        check_float("bias", bias, 1)
        check_length("bias", bias, weight.shape[0], "V")
    check_targets(targets, n, weight.shape[0] if shard is None else shard.vocab, ignore_index)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_same_dtype(hidden=hidden, weight=weight, bias=bias)
    check_positive("temperature", temperature)
    if softcap is not None:
        check_positive("softcap", softcap)
    return weight, shard
