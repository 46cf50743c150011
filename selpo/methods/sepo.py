"""SePO's policy loss (arXiv 2408.13518): reference-free, on the key tokens the oracle selected."""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels import linear_selective_loss
from ..logprobs import response_states


@dataclass
class SePO:
    """``-logsigmoid(gamma * (u_chosen - u_rejected) - margin)``, u the mean log-prob of the selected tokens.

    Reads ``batch.extras["mask"]`` (bool, the selected tokens, written by the score stage).
    """

    gamma: float = 1.0
    margin: float = 0.0
    backend: str = "auto"

    def loss(self, model, batch):
        hidden, head = response_states(model, batch.pairs)
        return linear_selective_loss(hidden, head.weight, batch.pairs.targets, batch.pairs.cu_seqlens,
                                     mask=batch.extras["mask"], loss="sepo", gamma=self.gamma, margin=self.margin,
                                     backend=self.backend, **head.op_kwargs())
