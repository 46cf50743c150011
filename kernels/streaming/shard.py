"""A head sharded over processes along the vocabulary: each process holds rows [start, start + V_local) of the
weight (and of the bias), and every process holds the same hidden rows, targets and upstream gradients.

A row's log-sum-exp over the whole vocabulary combines each shard's running max m and sum s of exp(z - m):
one all-reduce (MAX) of m gives M, one (SUM) of s * exp(m - M) gives the total; the target logit is summed in
the same all-reduce from the one shard that holds it. The backward forms each shard's rows of dL/dweight
locally and sums dL/dhidden over the processes. Per call: two [n] fp32 all-reduces in the forward (n rows
computed; one [2, n]), and one [n, D] fp32 all-reduce of the hidden gradient; never a weight or a logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import ledger
from ..utils import shift_of
from .passes import finish_lse


@dataclass(frozen=True)
class VocabShard:
    """This process's columns [start, start + size) of a vocabulary of ``vocab``, and the group sharing it."""

    group: object
    start: int
    size: int
    vocab: int

    def local_targets(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets as columns of this shard, outside [0, size) for a target another shard holds; whether
        each lies in it)."""
        local = targets.long() - self.start
        return local, (local >= 0) & (local < self.size)

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        ledger.record_comm("all_reduce", t)
        if ledger.executing():
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def combine(self, m, s, x_t, inside):
        """(lse over the whole vocabulary, the target logit) of each row, from this shard's m, s and x_t."""
        top = self.all_reduce(m.clone(), dist.ReduceOp.MAX)
        safe = shift_of(top)
        mine = s * torch.exp(m - safe)
        packed = self.all_reduce(torch.stack([mine, torch.where(inside, x_t, torch.zeros_like(x_t))]))
        return finish_lse(top, packed[0]), packed[1]


def vocab_shard(weight: torch.Tensor, group) -> VocabShard:
    """The shard of ``weight`` [V_local, D] in ``group``: shards are laid out by rank (one all-gather of the
    local sizes, checked once at the public edge)."""
    sizes = [torch.zeros((), dtype=torch.int64, device=weight.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor(weight.shape[0], dtype=torch.int64, device=weight.device), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return VocabShard(group, sum(sizes[:rank]), sizes[rank], sum(sizes))


def split_head(weight: torch.Tensor, process_group):
    """(this process's rows of the weight, its VocabShard or None): from ``process_group``, or from a DTensor
    weight sharded on dim 0 (tensor parallelism's column-wise plan for an output head), whose local rows are
    taken differentiably."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # a torch without DTensor
        DTensor = None
    if DTensor is not None and isinstance(weight, DTensor):
        if tuple(weight.placements) != (Shard(0),):
            raise ValueError("weight: a DTensor head must be sharded on dim 0 over a 1-D mesh, "
                             f"got {weight.placements}")
        if process_group is None:
            process_group = weight.device_mesh.get_group()
        weight = weight.to_local()
    if process_group is None:
        return weight, None
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialized")
    return weight, vocab_shard(weight, process_group)
