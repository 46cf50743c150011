"""How the hot path cuts its work: row chunks and vocabulary slices sized by one workspace budget.

The logits of a tile of rows x vocabulary columns live in one reused buffer of at most ``buffer_bytes``
(in the inputs' dtype, as a GEMM writes them), so the workspace does not grow with the vocabulary. Slices
are multiples of ``ALIGN`` columns, so every buffer row starts 16-byte aligned, as the GEMMs and the
vectorised loads of the passes want, and of equal width (``slices``): the fewest slices the buffer allows, so no
slice is a thin remainder (a GEMM of a few column tiles, a pass of few blocks, a launch for little work).
"""

from __future__ import annotations

import torch

from .. import ledger

# The logits buffer, per device type. On a GPU, 256 MiB holds 1,046 rows of a 128k vocabulary in bf16
# (GEMMs big enough for cuBLAS's full rate) and backward slices of 8,192 columns at 16k rows, so the fp32
# hidden-gradient accumulator, read and written once per slice, costs about 3% of the four GEMMs; the
# workspace stays about 3% of naive's at Llama-3-8B's head. On a CPU, 32 MiB keeps the tile in cache-sized
# pieces and the workspace under 5% of naive's at SmolLM2's.
BUFFER_BYTES = {"cuda": 1 << 28, "cpu": 1 << 25}
# The fused loss's buffer of whole-vocabulary rows. On a CPU its GEMMs run far below the BLAS's rate with a
# thin row chunk (170 rows of SmolLM2's vocabulary in 32 MiB: 1.3x the matmul floor; 1,365 rows in 256 MiB:
# 1.09x, measured on 2 cores), so the loss takes 256 MiB there; on a GPU, the same 256 MiB as above.
LOSS_BUFFER_BYTES = {"cuda": 1 << 28, "cpu": 1 << 28}
# Most rows of a forward's tile.
ROW_CHUNK = 4096
# Vocabulary slices are multiples of this many columns.
ALIGN = 128
# Fewest columns a backward slice has: narrower slices would make thin, slow GEMMs. When all gradient rows
# times this many columns overflow the buffer, the rows go in groups (see ``backward_groups``).
MIN_SLICE = 2048


def aligned(cols: int, vocab: int) -> int:
    """``cols`` rounded down to a multiple of ALIGN (at least ALIGN), at most ``vocab``."""
    return min(vocab, max(ALIGN, cols // ALIGN * ALIGN))


def slices(vocab: int, width: int) -> list[tuple[int, int]]:
    """[v0, v1) of the fewest slices of ``vocab`` columns at most ``width`` wide (a multiple of ALIGN, or the
    vocabulary): its ALIGN-column units shared out evenly, the wider slices first, so widths differ by at most
    ALIGN and only the last can end off the grid of ALIGN. V = 128,256 in slices of at most 8,192 columns: 10
    of 8,064 and 6 of 7,936, where slices as wide as the buffer would leave 15 of 8,192 and one of 5,376."""
    count = -(-vocab // width)
    units, wider = divmod(-(-vocab // ALIGN), count)
    bounds = [0]
    for k in range(count):
        bounds.append(min(vocab, bounds[-1] + (units + (k < wider)) * ALIGN))
    return list(zip(bounds[:-1], bounds[1:]))


def even_width(cols: int, vocab: int) -> int:
    """The widest of the equal ``slices`` of ``vocab`` columns at most ``cols`` (``aligned``) wide: what the
    buffer must hold, and the width that gives the same slices back."""
    return max(v1 - v0 for v0, v1 in slices(vocab, aligned(cols, vocab)))


def buffer_bytes(device: torch.device, sizes: dict | None = None) -> int:
    """The logits buffer's size for tensors on ``device`` (the device a dry run models, inside one), from
    ``sizes`` (default BUFFER_BYTES)."""
    sizes = BUFFER_BYTES if sizes is None else sizes
    return sizes.get(ledger.modeled_device(device), sizes["cuda"])


def forward_tiles(rows: int, vocab: int, elsize: int, budget_bytes: int) -> tuple[int, int]:
    """(rows per chunk, columns per slice) of a forward: chunks of up to ROW_CHUNK rows, and the fewest equal
    slices the buffer holds. Tall tiles keep a weight slice in cache across many rows: on 2 CPU cores SmolLM2's
    forward takes 1.41 s in 4,096 x 2,048 tiles against 1.85 s in 256 x 32,768 ones (the GEMMs alone: 1.32 s)."""
    chunk = max(1, min(rows, ROW_CHUNK))
    return chunk, even_width(budget_bytes // elsize // chunk, vocab)


def backward_groups(rows: int, vocab: int, elsize: int, budget_bytes: int) -> tuple[int, int]:
    """(rows per group, columns per slice) of a backward, which slices the vocabulary so that each slice's
    rows of dL/dweight are written once by one GEMM over all the rows of a group (one group unless the rows
    are very many)."""
    budget = budget_bytes // elsize
    group = max(1, min(rows, budget // min(vocab, MIN_SLICE)))
    return group, even_width(budget // group, vocab)


def pair_chunk_rows(vocab: int, elsize: int, budget_bytes: int) -> int:
    """Rows of whole-vocabulary logits the fused loss holds at once (it may take more for one long pair)."""
    return max(1, budget_bytes // elsize // vocab)
