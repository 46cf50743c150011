"""SimPO (Meng et al. 2024), a baseline: reference-free, length-normalised, on every response token."""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels import linear_selective_loss
from ..logprobs import response_states


@dataclass
class SimPO:
    """``-logsigmoid(beta * (mean log-prob of chosen - of rejected) - gamma)``."""

    beta: float = 2.0
    gamma: float = 0.5
    backend: str = "auto"

    def loss(self, model, batch):
        hidden, head = response_states(model, batch.pairs)
        return linear_selective_loss(hidden, head.weight, batch.pairs.targets, batch.pairs.cu_seqlens, loss="simpo",
                                     beta=self.beta, gamma=self.gamma, backend=self.backend, **head.op_kwargs())
