"""SimPO (Meng et al. 2024), a baseline: reference-free, length-normalised, on every response token."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

from ..batches import Example
from ..kernels import linear_selective_loss
from ..logprobs import response_states
from ..options import option, require
from .base import Method, Prepared


@dataclass
class SimPOOptions:
    """SimPO (method "simpo"): the reference-free baseline on every response token."""

    SECTION: typing.ClassVar[str] = "simpo"
    beta: float = option(2.0, "Reward scale beta.")
    gamma: float = option(0.5, "Target reward margin gamma, absolute: subtracted after beta scales the mean "
                          "log-prob gap, -logsigmoid(beta * gap - gamma); the official SimPO code's "
                          "gamma_beta_ratio is gamma / beta (its gamma 0.5 at beta 2.0 is a ratio of 0.25).")

    def __post_init__(self):
        require(self.SECTION, "beta", math.isfinite(self.beta) and self.beta > 0, f"must be > 0, got {self.beta}")
        require(self.SECTION, "gamma", math.isfinite(self.gamma), f"must be finite, got {self.gamma}")


@dataclass
class SimPO:
    """``-logsigmoid(beta * (mean log-prob of chosen - of rejected) - gamma)``."""

    beta: float = SimPOOptions.beta
    gamma: float = SimPOOptions.gamma
    backend: str = "auto"

    def loss(self, model, batch):
        hidden, head = response_states(model, batch.pairs)
        return linear_selective_loss(hidden, head.weight, batch.pairs.targets, batch.pairs.cu_seqlens, loss="simpo",
                                     beta=self.beta, gamma=self.gamma, backend=self.backend, **head.op_kwargs())


class SimPOMethod(Method):
    name = "simpo"
    title = "SimPO"
    options = SimPOOptions
    strength = "simpo.beta"
    grid = (2.0, 5.0)

    def prepare(self, ctx, policy, tokenizer, key):
        cfg = ctx.config.simpo
        objective = SimPO(beta=cfg.beta, gamma=cfg.gamma, backend=ctx.config.backend)
        return Prepared(objective, [Example(p) for p in ctx.pairs("train")])
