"""The model body over a batch, in the batch's token layout, the layout chosen for a model, and the tally of the
tokens the body computed.

Every stage runs a body through ``body_states`` (the ops read the response positions of its result; token-level
reward models the tokens themselves), so the tally counts every body forward of a stage except sampling: the
tokens computed in the batch's layout and, for the same responses, in the padded layout (``body_tokens``).
"""

from __future__ import annotations

import torch

from .data import PairBatch, body_tokens
from .data.packing import PADDED
from .head import last_hidden_states
from .segment_attention import segmented_hidden_states


class BodyTally:
    """Tokens the body computed since ``reset``, what the padded layout would have computed for them, and the
    layouts it ran in."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.computed, self.padded, self.layouts = 0, 0, set()

    def add(self, pairs: PairBatch) -> None:
        computed, padded = body_tokens(pairs)
        self.computed += computed
        self.padded += padded
        self.layouts.add(pairs.layout)

    def totals(self, accelerator) -> dict:
        """The counts summed over processes, and this process's layouts (every process must call it)."""
        local = torch.tensor([self.computed, self.padded], dtype=torch.int64, device=accelerator.device)
        computed, padded = (accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1
                            else local).tolist()
        return {"body_tokens": computed, "padded_tokens": padded, "body_layouts": sorted(self.layouts)}


TALLY = BodyTally()
# The attribute of a model holding the layout chosen for its body (selpo.packing_check.choose_layout).
LAYOUT = "_selpo_layout"


def layout_of(model) -> str:
    """The token layout chosen for ``model``'s body by ``selpo.packing_check.choose_layout``; padded if none was."""
    return model.__dict__.get(LAYOUT, PADDED)


def body_states(model: torch.nn.Module, pairs: PairBatch) -> torch.Tensor:
    """[R * T, D] the last hidden states of ``pairs``' token rows, flattened: padded rows as they are, a packed or
    shared row with its attention following the row's segments (``selpo.segment_attention``;
    ``selpo.packing_check`` says whether a model can). Counted in ``TALLY``."""
    if pairs.segments is None:
        hidden = last_hidden_states(model, pairs.input_ids, pairs.attention_mask)
    else:
        hidden = segmented_hidden_states(model, pairs.input_ids, pairs.position_ids, pairs.segments)
    TALLY.add(pairs)
    return hidden.flatten(0, 1)
