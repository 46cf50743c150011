"""SePO (arXiv 2408.13518): a DPO-trained oracle scores every response token (the ``oracle`` and ``score``
stages; ``score`` and its section are declared here, its code is ``selpo.stages.score``), and the policy's
reference-free loss reads only the key tokens it selected."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch

from ..batches import Example
from ..context import row_pair
from ..kernels import linear_selective_loss
from ..logprobs import response_states
from ..options import option, require
from ..stage import Stage
from .base import Method, Prepared
from .oracle import ORACLE

SCORE_RULES = ("paper", "released")


@dataclass
class SePOOptions:
    """SePO (method "sepo"): the policy's reference-free loss on the key tokens the oracle selected."""

    SECTION: typing.ClassVar[str] = "sepo"
    gamma: float = option(1.0, "Reward scale gamma (1 in the authors' code).")
    margin: float = option(0.0, "Target reward margin, subtracted after gamma scales the gap: "
                           "-logsigmoid(gamma * (u_chosen - u_rejected) - margin) (0 in the authors' code).")

    def __post_init__(self):
        require(self.SECTION, "gamma", self.gamma > 0, f"must be > 0, got {self.gamma}")
        require(self.SECTION, "margin", math.isfinite(self.margin), f"must be finite, got {self.margin}")


@dataclass
class ScoreConfig:
    """SePO: token rewards log p_oracle - log p_reference, and the key tokens chosen from them."""

    SECTION: typing.ClassVar[str] = "score"
    chosen_ratio: float = option(0.3, "Share of each chosen response's tokens selected: the highest rewards.")
    rejected_ratio: float = option(0.3, "Share of each rejected response's tokens selected: the lowest rewards.")
    batch_size: int = option(16, "Pairs per forward pass of the scoring models.")
    rule: str = option("paper", "Which tokens may be selected: paper (every response token; k = max(1, "
                       "floor(ratio * n)) of n) or released (the authors' code: the first response token is never "
                       "selectable, k = max(1, int(ratio * (n - 1))): their float arithmetic, one less than the "
                       "exact floor for a few (ratio, n), e.g. 28 for ratio 0.58 and n = 51, and at least 1 where "
                       "their code gives 0 and a NaN loss; a one-token response keeps its token; and a response that "
                       "data.max_length cut has its last token replaced by EOS, scored and trained as EOS). Under "
                       "paper a cut response simply ends where it was cut, with no EOS.")

    def __post_init__(self):
        for name in ("chosen_ratio", "rejected_ratio"):
            value = getattr(self, name)
            require(self.SECTION, name, 0 < value <= 1, f"must lie in (0, 1], got {value}")
        require(self.SECTION, "rule", self.rule in SCORE_RULES, f"must be one of {SCORE_RULES}, got {self.rule!r}")
        require(self.SECTION, "batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}")


SCORE = Stage("score", needs=("data", "oracle"), keys=("score",), options=ScoreConfig,
              help="score every response token with the oracle and select the key tokens (SePO)")


@dataclass
class SePO:
    """``-logsigmoid(gamma * (u_chosen - u_rejected) - margin)``, u the mean log-prob of the selected tokens.

    Reads ``batch.extras["mask"]`` (bool, the selected tokens, written by the score stage).
    """

    gamma: float = SePOOptions.gamma
    margin: float = SePOOptions.margin
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
    options = SePOOptions
    stages = (ORACLE, SCORE)
    strength = "sepo.gamma"
    grid = (1.0, 2.5)
    selects = True
    legend = ("the oracle's reward log p<sub>oracle</sub> - log p<sub>initial</sub>; outlined: the selected key "
              "tokens (highest rewards in chosen responses, lowest in rejected ones)")

    def prepare(self, ctx, policy, tokenizer, key):
        cfg = ctx.config.sepo
        objective = SePO(gamma=cfg.gamma, margin=cfg.margin, backend=ctx.config.backend)
        return Prepared(objective, selected_examples(ctx.scored()))

    def token_view(self, ctx, pairs, logps):
        """The score stage's rows of the same (first) training pairs: the oracle's rewards and key tokens."""
        return ctx.scored()[:len(pairs)]
