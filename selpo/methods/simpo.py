"""SimPO (Meng et al. 2024), a baseline: reference-free, length-normalised, on every response token."""

from __future__ import annotations

from dataclasses import dataclass

from ..examples import Example
from ..kernels import linear_selective_loss
from ..logprobs import response_states
from .base import Method, Prepared

BETA, MARGIN = 2.0, 0.5  # train.beta and train.margin when none is given


@dataclass
class SimPO:
    """``-logsigmoid(beta * (mean log-prob of chosen - of rejected) - gamma)``."""

    beta: float = BETA
    gamma: float = MARGIN
    backend: str = "auto"

    def loss(self, model, batch):
        hidden, head = response_states(model, batch.pairs)
        return linear_selective_loss(hidden, head.weight, batch.pairs.targets, batch.pairs.cu_seqlens, loss="simpo",
                                     beta=self.beta, gamma=self.gamma, backend=self.backend, **head.op_kwargs())


class SimPOMethod(Method):
    name = "simpo"
    title = "SimPO"
    stages = ("data", "train", "eval", "report")
    strength = "train.beta"
    grid = (2.0, 5.0)

    def prepare(self, ctx, policy, tokenizer, key):
        cfg = ctx.config.train
        objective = SimPO(beta=BETA if cfg.beta is None else cfg.beta,
                          gamma=MARGIN if cfg.margin is None else cfg.margin, backend=ctx.config.backend)
        return Prepared(objective, [Example(p) for p in ctx.pairs("train")])
