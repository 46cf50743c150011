"""DPO on every response token, with reference log-probs computed once before training.

Because the reference's log-probs are fixed, they are computed in one pass over the data and stored
with the examples (``extras["ref_logps"]``): no reference model is held in memory while training.
"""

from __future__ import annotations

from dataclasses import dataclass

from accelerate import Accelerator

from ..examples import Example
from ..kernels import linear_selective_loss
from ..logprobs import pair_logps, response_states


@dataclass
class DPO:
    """``-logsigmoid(beta * (sum of log-ratios of chosen - of rejected))`` over all response tokens."""

    beta: float = 0.1
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
                        backend=backend)
    return [Example(e.pair, {**e.extras, "ref_logps": v}) for e, v in zip(examples, values)]
