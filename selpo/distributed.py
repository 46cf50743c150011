"""Work shared across processes: each process takes every world-th batch; all get the whole result back.

Batches are cut from the item list before they are spread, so a batch holds the same items (and the
same padding) on any number of processes: sharded results equal unsharded ones.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from accelerate import Accelerator
from accelerate.utils import gather_object

from . import progress

T = TypeVar("T")
R = TypeVar("R")


def map_batches(accelerator: Accelerator, items: Sequence[T], batch_size: int,
                fn: Callable[[list[T]], list[R]], *, desc: str | None = None) -> list[R]:
    """``fn`` over consecutive batches of ``items`` (one result per item), spread over the processes.

    Returns the results of all items, in the order of ``items``, on every process. ``fn`` should return
    CPU values: they are pickled to be gathered. ``desc`` names the work on a progress bar of the main
    process's batches (``selpo.progress``); none without it.
    """
    batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    mine_indices = range(accelerator.process_index, len(batches), accelerator.num_processes)
    mine = []
    shown = desc is not None and accelerator.is_main_process
    with progress.bar(len(mine_indices), desc or "", show=shown) as bar:
        for b in mine_indices:
            results = fn(batches[b])
            if len(results) != len(batches[b]):
                raise ValueError(f"fn returned {len(results)} results for a batch of {len(batches[b])} items")
            mine.append((b, results))
            bar.update(1)
    everyone = gather_object(mine) if accelerator.num_processes > 1 else mine
    return [r for _, results in sorted(everyone, key=lambda pair: pair[0]) for r in results]
