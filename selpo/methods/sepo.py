"""SePO (arXiv 2408.13518): a DPO-trained oracle scores every response token (the ``oracle`` and ``score``
stages), and the policy's reference-free loss reads only the key tokens it selected."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import row_pair
from ..examples import Example
from ..kernels import linear_selective_loss
from ..logprobs import response_states
from .base import Method, Prepared

MARGIN = 0.0  # train.margin when none is given


@dataclass
class SePO:
    """``-logsigmoid(gamma * (u_chosen - u_rejected) - margin)``, u the mean log-prob of the selected tokens.

    Reads ``batch.extras["mask"]`` (bool, the selected tokens, written by the score stage).
    """

    gamma: float = 1.0
    margin: float = MARGIN
    backend: str = "auto"

    def loss(self, model, batch):
        hidden, head = response_states(model, batch.pairs)
        return linear_selective_loss(hidden, head.weight, batch.pairs.targets, batch.pairs.cu_seqlens,
                                     mask=batch.extras["mask"], loss="sepo", gamma=self.gamma, margin=self.margin,
                                     backend=self.backend, **head.op_kwargs())


def selected_examples(rows: list[dict]) -> list[Example]:
    """Training examples carrying the selected-token masks (``extras["mask"]``) of the score stage's rows."""
    return [Example(row_pair(r), {"mask": (torch.tensor(r["chosen_mask"], dtype=torch.bool),
                                           torch.tensor(r["rejected_mask"], dtype=torch.bool))}) for r in rows]


class SePOMethod(Method):
    name = "sepo"
    title = "SePO"
    stages = ("data", "oracle", "score", "train", "eval", "report")
    strength = "train.gamma"
    grid = (1.0, 2.5)
    selects = True
    legend = ("the oracle's reward log p<sub>oracle</sub> - log p<sub>initial</sub>; outlined: the selected key "
              "tokens (highest rewards in chosen responses, lowest in rejected ones)")

    def prepare(self, ctx, policy, tokenizer, key):
        cfg = ctx.config.train
        objective = SePO(gamma=cfg.gamma, margin=MARGIN if cfg.margin is None else cfg.margin,
                         backend=ctx.config.backend)
        return Prepared(objective, selected_examples(ctx.scored()))

    def token_view(self, ctx, pairs, logps):
        """The score stage's rows of the same (first) training pairs: the oracle's rewards and key tokens."""
        return ctx.scored()[:len(pairs)]
