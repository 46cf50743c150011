"""DPO on every response token, a baseline, with reference log-probs computed once before training.

Because the reference's log-probs are fixed, they are computed in one pass over the data and stored
with the examples (``extras["ref_logps"]``): no reference model is held in memory while training.
The reference is the policy as it starts.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

from accelerate import Accelerator

from ..batches import Example
from ..context import Context
from ..kernels import linear_selective_loss
from ..logprobs import pair_logps, response_states
from ..options import option, require
from .base import Method, Prepared


@dataclass
class DPOOptions:
    """DPO (method "dpo"): the baseline on every response token."""

    SECTION: typing.ClassVar[str] = "dpo"
    beta: float = option(0.1, "DPO's KL strength beta.")

    def __post_init__(self):
        require(self.SECTION, "beta", math.isfinite(self.beta) and self.beta > 0, f"must be > 0, got {self.beta}")


@dataclass
class DPO:
    """``-logsigmoid(beta * (sum of log-ratios of chosen - of rejected))`` over all response tokens."""

    beta: float = DPOOptions.beta
    backend: str = "auto"

    def loss(self, model, batch):
        hidden, head = response_states(model, batch.pairs)
        return linear_selective_loss(hidden, head.weight, batch.pairs.targets, batch.pairs.cu_seqlens, loss="dpo",
                                     ref_logps=batch.extras["ref_logps"], beta=self.beta, backend=self.backend,
                                     **head.op_kwargs())


def with_reference_logps(accelerator: Accelerator, reference, examples: list[Example], *, pad_id: int,
                         batch_size: int, backend: str = "auto") -> list[Example]:
    """The examples with ``extras["ref_logps"]``: the reference's log-prob of each response token.

    Computed under the accelerator's autocast, as the policy's will be, so a policy equal to the
    reference starts at a DPO margin of 0 up to rounding; the work is sharded over the processes.
    """
    values = pair_logps(accelerator, reference, [e.pair for e in examples], pad_id=pad_id, batch_size=batch_size,
                        backend=backend, desc="reference log-probs")
    return [Example(e.pair, {**e.extras, "ref_logps": v}) for e, v in zip(examples, values)]


def reference_examples(ctx: Context, reference, tokenizer) -> list[Example]:
    """Every training pair with the reference's log-probs of its response tokens (computed once)."""
    return with_reference_logps(ctx.accelerator, reference, [Example(p) for p in ctx.pairs("train")],
                                pad_id=tokenizer.pad_token_id, batch_size=ctx.config.train.micro_batch_size,
                                backend=ctx.config.backend)


class DPOMethod(Method):
    name = "dpo"
    title = "DPO"
    options = DPOOptions
    strength = "dpo.beta"
    grid = (0.1, 0.5)

    def prepare(self, ctx, policy, tokenizer, key):
        objective = DPO(beta=ctx.config.dpo.beta, backend=ctx.config.backend)
        return Prepared(objective, reference_examples(ctx, policy, tokenizer))
