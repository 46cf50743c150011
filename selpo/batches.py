"""Training examples: a tokenized pair plus the per-token values a method needs, and their packed batches.

A method may need more than the tokens: DPO the reference log-probs, SePO the selected-token masks.
Each such value is stored per response token (chosen and rejected separately) and packed into the op
layout (chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}) next to the batch's targets, so a method
reads ``batch.extras[name]`` aligned with ``batch.targets``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data import PairBatch, TokenizedPair, TokenizedRanking, collate_pairs, collate_ranked


@dataclass
class Example:
    """One preference pair (or ranking) and its per-token extras: name -> one tensor per response, best
    first, as long as that response: (chosen values [len(chosen_ids)], rejected values [len(rejected_ids)])."""

    pair: TokenizedPair | TokenizedRanking
    extras: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class Batch:
    """A packed batch of pairs (see ``selpo.data.PairBatch``) and the extras packed like its targets."""

    pairs: PairBatch
    extras: dict[str, torch.Tensor]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.pairs.to(device), {k: v.to(device) for k, v in self.extras.items()})


def collate(examples: list[Example], pad_id: int, layout: str = "padded") -> Batch:
    """Packs examples (all pairs, or all rankings of one size) in the token ``layout`` (``collate_pairs``); every
    example must carry the same extras, each as long as its response."""
    ranked = bool(examples) and isinstance(examples[0].pair, TokenizedRanking)
    pairs = (collate_ranked if ranked else collate_pairs)([e.pair for e in examples], pad_id, layout)
    names = examples[0].extras.keys() if examples else ()
    ranks = len(examples[0].pair.responses) if examples else 0
    extras = {}
    for name in names:
        packed = torch.cat([e.extras[name][k] for k in range(ranks) for e in examples])
        if packed.shape[0] != pairs.targets.shape[0]:
            raise ValueError(f"extra {name!r} has {packed.shape[0]} values for {pairs.targets.shape[0]} response "
                             "tokens: it must hold one value per chosen and rejected response token")
        extras[name] = packed
    return Batch(pairs, extras)


def split_packed(values: torch.Tensor, cu_seqlens: torch.Tensor, ranks: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """The inverse of packing: per pair, its (chosen, rejected) slices of a packed [N] tensor; per ranking of
    ``ranks`` responses, its ``ranks`` slices, best first."""
    cu = cu_seqlens.tolist()
    groups = (len(cu) - 1) // ranks
    pieces = [values[cu[s]:cu[s + 1]] for s in range(len(cu) - 1)]
    return [tuple(pieces[k * groups + g] for k in range(ranks)) for g in range(groups)]
