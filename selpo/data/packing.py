"""Token layouts of a batch for the model body: ``padded`` rows, or one token row without padding in which each
prompt+response is its own causal segment (``packed``), or each prompt appears once, followed by its responses
(``shared``). The row's attention pattern is a list of blocks (``Segments``), read by ``selpo.segment_attention``.

Shared saves the body the second (and K-th) pass over each prompt, packed and shared the padding; on multi-turn
dialogue the prompt is most of every row. Position ids restart for every segment and, in shared, continue after
the prompt for every response, so each token sees the positions it has in the padded row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .batch import PairBatch

PADDED, PACKED, SHARED = "padded", "packed", "shared"
LAYOUTS = (PADDED, PACKED, SHARED)


@dataclass(frozen=True)
class Segments:
    """The attention pattern of one token row as blocks ``(q0, q1, c0, c1)``: the queries ``[q0, q1)`` attend to
    the context ``[c0, c1)`` (a prompt; empty when ``c0 == c1``) followed by themselves, causally aligned at the
    bottom right. A block's keys hold positions ``0 .. n_k - 1`` in order, so a window in positions is a window
    in key index. The query ranges tile the row in order.

    The same blocks in the flat form a varlen kernel takes: the keys of block b are
    ``key_index[cu_k[b]:cu_k[b + 1]]`` of the row, its queries ``query_index[cu_q[b]:cu_q[b + 1]]``; the offsets
    are kept as ints (for loops on the host) and as int32 tensors (for kernels on the device) built from them.
    """

    kind: str
    blocks: tuple[tuple[int, int, int, int], ...]
    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    # [L] and [sum of the blocks' key counts] int64 indices into the row.
    query_index: torch.Tensor
    key_index: torch.Tensor
    # int32 [blocks + 1]: cu_q and cu_k on the device.
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor

    @property
    def length(self) -> int:
        """The tokens of the row."""
        return self.cu_q[-1]

    @property
    def max_q(self) -> int:
        return max(b - a for a, b in zip(self.cu_q, self.cu_q[1:]))

    @property
    def max_k(self) -> int:
        return max(b - a for a, b in zip(self.cu_k, self.cu_k[1:]))

    def score_entries(self) -> int:
        """Query-key products of the blocks (per head and layer, without a window): a block of n_q queries over
        n_k keys computes ``n_q (n_k - n_q)`` context products and its causal triangle ``n_q (n_q + 1) / 2``."""
        total = 0
        for q0, q1, c0, c1 in self.blocks:
            n = q1 - q0
            total += n * (c1 - c0) + n * (n + 1) // 2
        return total

    def to(self, device: str | torch.device) -> Segments:
        return Segments(self.kind, self.blocks, self.cu_q, self.cu_k, self.query_index.to(device),
                        self.key_index.to(device), self.cu_seqlens_q.to(device), self.cu_seqlens_k.to(device))


def _segments(kind: str, blocks: list[tuple[int, int, int, int]]) -> Segments:
    """``Segments`` of ``blocks``, which ``pack_row`` makes tile the row in order, each after its context."""
    cu_q, cu_k, keys = [0], [0], []
    for q0, q1, c0, c1 in blocks:
        cu_q.append(q1)
        cu_k.append(cu_k[-1] + (c1 - c0) + (q1 - q0))
        keys += [torch.arange(c0, c1), torch.arange(q0, q1)]
    return Segments(kind, tuple(blocks), tuple(cu_q), tuple(cu_k), torch.arange(cu_q[-1]), torch.cat(keys),
                    torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32))


@dataclass
class PackedRow:
    """One token row of a packed or shared batch: its ids and position ids ([1, L]), the row index of the
    hidden state that predicts each response token and of the token itself ([N] each, in the order of the
    responses given), and its blocks."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor
    segments: Segments


def pack_row(prompts: list[list[int]], responses: list[list[list[int]]], layout: str) -> PackedRow:
    """Lays out G prompts and, per prompt, its K responses (``responses[k][g]``) in one row: ``packed`` as the
    K * G sequences prompt+response in rank-major order, ``shared`` group by group as the prompt then its K
    responses. The predicting positions come rank-major, as the padded layout's targets do."""
    ids, pos, blocks, predict, own = [], [], [], {}, {}

    def append(tokens: list[int], first_position: int) -> int:
        start = len(ids)
        ids.extend(tokens)
        pos.extend(range(first_position, first_position + len(tokens)))
        return start

    ranks, groups = len(responses), len(prompts)
    if layout == PACKED:
        for k in range(ranks):
            for g, prompt in enumerate(prompts):
                start = append(prompt + responses[k][g], 0)
                blocks.append((start, len(ids), start, start))
                predict[k, g] = torch.arange(len(responses[k][g])) + (start + len(prompt) - 1)
                own[k, g] = predict[k, g] + 1
    elif layout == SHARED:
        for g, prompt in enumerate(prompts):
            start = append(prompt, 0)
            blocks.append((start, len(ids), start, start))
            for k in range(ranks):
                first = append(responses[k][g], len(prompt))
                blocks.append((first, len(ids), start, start + len(prompt)))
                # The prompt's last token predicts the first token of every response.
                predict[k, g] = torch.tensor([start + len(prompt) - 1, *range(first, len(ids) - 1)])
                own[k, g] = torch.arange(first, len(ids))
    else:
        raise ValueError(f"layout must be {PACKED!r} or {SHARED!r} here, got {layout!r}")
    def flat(index: dict) -> torch.Tensor:
        return torch.cat([index[k, g] for k in range(ranks) for g in range(groups)]).to(torch.int64)

    return PackedRow(torch.tensor([ids], dtype=torch.int64), torch.tensor([pos], dtype=torch.int64), flat(predict),
                     flat(own), _segments(layout, blocks))


def body_tokens(batch: PairBatch) -> tuple[int, int]:
    """(tokens the body computes for ``batch`` in its layout, tokens it computes for the same responses padded:
    rows x width), for stages to report the saving."""
    lengths = batch.prompt_lengths + batch.cu_seqlens.diff().to(batch.prompt_lengths.dtype)
    return batch.input_ids.numel(), lengths.numel() * int(lengths.max())


def attention_entries(batch: PairBatch) -> int:
    """Attention score entries (query-key products, per head and layer) the body's attention computes for
    ``batch``: padded, a dense [T, T] per row, as SDPA and eager attention do under a padding mask; packed and
    shared, the blocks' products (``Segments.score_entries``), proportional to what is attended."""
    if batch.segments is None:
        rows, width = batch.input_ids.shape
        return rows * width * width
    return batch.segments.score_entries()
