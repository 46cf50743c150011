"""FSDP1 without sharding (one process, or ``NO_SHARD``) and frozen weights: the frozen modules left out of FSDP.

Torch's FSDP1 (2.11 on an H200, 2.13 here) loses a unit whose parameters are all frozen (a LoRA model's root: the
embedding, final norm and head) when it does not shard: its backward's catch-all reshard takes a flat parameter that
points at its own shard for one already resharded (torch's "brittle" check, pytorch/pytorch#83956), so the unit's
parameters stay plain tensors. A tied embedding and head then fail the next forward (``as_params=True
type(prim_param)=<class 'torch.Tensor'>``), any other such parameter the next state dict (it is missing). Sharded
(``FULL_SHARD`` over two processes) the same model trains (tests/test_fsdp1.py). Without sharding, every process holds
every weight anyway, so the frozen ones are left out of FSDP (``ignored_modules``) at no cost in memory: each process
keeps them as it loaded them; frozen, they need no gradient reduction. FSDP2 needs none of this.
"""

from __future__ import annotations

import contextlib
import re

from torch import nn
from torch.distributed.fsdp import ShardingStrategy


def frozen_modules(module: nn.Module) -> list[nn.Module]:
    """The smallest modules of ``module`` holding only frozen parameters (a LoRA layer's base layer, not the LoRA
    layer; a frozen embedding and the head tied to it): the outermost modules with parameters, none trained."""
    if next(module.parameters(recurse=False), None) is not None and not any(
            p.requires_grad for p in module.parameters()):
        return [module]
    return [found for child in module.children() for found in frozen_modules(child)]


def unsharded(plugin, num_processes: int) -> bool:
    """Whether Accelerate's FSDP1 ``plugin`` keeps every weight whole on each of ``num_processes`` (FSDP turns any
    strategy into ``NO_SHARD`` on one process)."""
    strategy = plugin.sharding_strategy or plugin.reshard_after_forward
    return num_processes == 1 or strategy == ShardingStrategy.NO_SHARD


@contextlib.contextmanager
def ignoring_frozen(plugin, module: nn.Module, num_processes: int):
    """Within the block, Accelerate's FSDP1 ``plugin`` also leaves out ``module``'s ``frozen_modules`` (with what
    the user's configuration leaves out: a list of modules or a pattern of their names), where it does not shard
    (``unsharded``); sharded, leaving them out would keep a whole copy on every process."""
    original = plugin.ignored_modules
    extra = frozen_modules(module) if unsharded(plugin, num_processes) else []
    if extra:
        given = original
        if isinstance(given, str):  # read as Accelerate reads a pattern: whole names matched
            pattern = re.compile(given)
            given = [sub for name, sub in module.named_modules() if pattern.fullmatch(name)]
        given = list(given or [])
        plugin.ignored_modules = given + [m for m in extra if all(m is not g for g in given)]
    try:
        yield
    finally:
        plugin.ignored_modules = original
