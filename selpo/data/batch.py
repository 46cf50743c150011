"""Batches of pairs in the token layout the body takes and the response layout the fused ops take, and the seeded,
resumable order of the batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from .packing import LAYOUTS, PADDED, Segments, pack_row
from .pairs import TokenizedPair, TokenizedRanking


@dataclass
class PairBatch:
    """P pairs for the body and the fused ops. The response layout the ops take is the same in every token layout
    (``selpo.data.packing``): ``h = hidden.flatten(0, 1)[positions]`` are the hidden states that predict ``targets``,
    segmented by ``cu_seqlens`` as chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}, with ``hidden`` the body's
    last hidden states of ``input_ids`` (``selpo.logprobs.response_states`` runs the body for the layout).

    Padded (``segments`` None): 2P right-padded rows, prompt+chosen for pairs 0..P-1, then prompt+rejected.
    Packed and shared: one row without padding, its attention pattern in ``segments``; in shared the first
    tokens of a prompt's responses are all predicted from the prompt's last token, so ``positions`` repeats it.

    Rankings of K responses (``collate_ranked``) use the same layout rank by rank: segment ``k * P + g`` (and
    padded row) holds the k-th best response of group g, so a pair is the case K = 2.
    """

    # [R, T] int64 token ids (padded: R = KP, padded on the right with pad_id; packed and shared: R = 1).
    input_ids: torch.Tensor
    # [R, T] int64, 1 on real tokens and 0 on padding.
    attention_mask: torch.Tensor
    # [N] int64 flat indices into the [R * T] positions: the one predicting each response token.
    positions: torch.Tensor
    # [N] int64 flat indices of each response token itself (a token-level reward model reads its state there).
    tokens: torch.Tensor
    # [N] int64 response token ids (N = all response tokens of the batch).
    targets: torch.Tensor
    # int32 [KP + 1] boundaries of the segments chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}.
    cu_seqlens: torch.Tensor
    # [P] int64 source-dataset row of each pair (or ranking).
    rows: torch.Tensor
    # [KP] int64 the prompt length of each response segment.
    prompt_lengths: torch.Tensor
    # [R, T] int64 position ids (None: padded, the body counts 0, 1, ... along each row).
    position_ids: torch.Tensor | None = None
    # The attention pattern of the row (None: padded).
    segments: Segments | None = None

    @property
    def num_pairs(self) -> int:
        return self.rows.shape[0]

    @property
    def layout(self) -> str:
        return PADDED if self.segments is None else self.segments.kind

    def to(self, device: str | torch.device) -> PairBatch:
        return PairBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                            for f in fields(self)})


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, layout: str = PADDED) -> PairBatch:
    """Lays out pairs for the body and the ops (``PairBatch``); each pair needs a prompt token and response
    tokens. ``layout``: ``"padded"``, ``"packed"`` or ``"shared"`` (``selpo.data.packing``)."""
    return _collate(pairs, pad_id, TokenizedPair, "pairs", layout)


def collate_ranked(rankings: list[TokenizedRanking], pad_id: int, layout: str = PADDED) -> PairBatch:
    """Lays out rankings of the same size K >= 1 rank by rank (``PairBatch``), in ``layout`` as ``collate_pairs``."""
    sizes = {len(getattr(r, "responses", ())) for r in rankings} if isinstance(rankings, (list, tuple)) else set()
    if len(sizes) > 1 or 0 in sizes:
        raise ValueError(f"rankings must all hold the same number K >= 1 of responses, got sizes {sorted(sizes)}")
    return _collate(rankings, pad_id, TokenizedRanking, "rankings", layout)


def _collate(items: list, pad_id: int, kind: type, name: str, layout: str) -> PairBatch:
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{name} must be a non-empty list of {kind.__name__}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f"{name} must hold {kind.__name__}, got {type(item).__name__}")
        if not item.prompt_ids or not all(item.responses):
            raise ValueError(f"{name}: row {item.row} has an empty prompt or response; tokenize_pairs drops those")
    ranks = len(items[0].responses)
    prompts = [item.prompt_ids for item in items] * ranks
    responses = [item.responses[k] for k in range(ranks) for item in items]
    lengths = torch.tensor([0] + [len(r) for r in responses], dtype=torch.int64)
    common = dict(targets=torch.tensor([t for r in responses for t in r], dtype=torch.int64),
                  cu_seqlens=lengths.cumsum(0).to(torch.int32),
                  rows=torch.tensor([item.row for item in items], dtype=torch.int64),
                  prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.int64))
    if layout != PADDED:
        by_rank = [[item.responses[k] for item in items] for k in range(ranks)]
        row = pack_row([item.prompt_ids for item in items], by_rank, layout)
        return PairBatch(input_ids=row.input_ids, attention_mask=torch.ones_like(row.input_ids),
                         positions=row.positions, tokens=row.tokens, position_ids=row.position_ids,
                         segments=row.segments, **common)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(responses), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(responses), width), dtype=torch.int64)
    positions = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        length = len(prompt) + len(response)
        input_ids[i, :length] = torch.tensor(prompt + response, dtype=torch.int64)
        attention_mask[i, :length] = 1
        positions.append(torch.arange(len(response), dtype=torch.int64) + (i * width + len(prompt) - 1))
    positions = torch.cat(positions)
    return PairBatch(input_ids=input_ids, attention_mask=attention_mask, positions=positions, tokens=positions + 1,
                     **common)


class BatchSchedule:
    """Which items form the batch of each training step: every epoch is a fresh permutation drawn from
    (seed, epoch), cut into ``num_items // batch_size`` full batches (the remainder waits for a later
    epoch's draw). ``indices(step)`` depends only on (seed, step), so a resumed run sees the same batches."""

    def __init__(self, num_items: int, batch_size: int, *, seed: int):
        for name, value, low in (("num_items", num_items, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if batch_size > num_items:
            raise ValueError(f"batch_size={batch_size} is larger than the {num_items} items")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.steps_per_epoch = num_items // batch_size
        self._epoch, self._order = -1, None

    def indices(self, step: int) -> list[int]:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._epoch = epoch
        return self._order[k * self.batch_size:(k + 1) * self.batch_size].tolist()

    def iter_from(self, start_step: int = 0):
        """Batches of steps start_step, start_step + 1, ... without end."""
        step = start_step
        while True:
            yield self.indices(step)
            step += 1


def seeded_subset(n: int, fraction: float, seed: int) -> list[int]:
    """The sorted indices of a random ``ceil(fraction * n)`` of ``n`` items, drawn with ``seed``: the pairs the
    first oracle or reward model learns from."""
    k = math.ceil(fraction * n)
    return sorted(np.random.default_rng([seed, n]).permutation(n)[:k].tolist())
