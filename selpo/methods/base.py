"""What a training method is: how a batch becomes a loss. The loop (``selpo.trainer``) knows nothing else.

A method reads the policy's last hidden states at the response positions and its output head
(``selpo.logprobs.response_states``) and hands them to a fused op, the head's weight with
``**head.op_kwargs()`` (its bias and logit transform, ``selpo.head``): no method ever builds full logits.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..examples import Batch


class Method(Protocol):
    """A training method: the loss of one micro-batch and its detached metrics.

    ``loss(model, batch)`` returns ``(loss, metrics)``: a 0-dim loss, the mean over the batch's pairs,
    and metrics as detached 1-dim tensors (e.g. per pair: "accuracy", "margin", "chosen_reward",
    "rejected_reward"; per response: "selected", the tokens the loss read, from which the module adds
    "token_share"), which the loop averages over the global batch.
    """

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class MethodModule(nn.Module):
    """The model and its method as one module whose forward returns the loss.

    The loop wraps this module with Accelerate (DDP, FSDP), so the whole loss, including the output
    head used by the fused op, runs inside the wrapped forward, where those wrappers expect it.
    """

    def __init__(self, lm: nn.Module, method: Method):
        super().__init__()
        self.lm = lm
        self.method = method

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = self.method.loss(self.lm, batch)
        if "selected" in metrics:  # the share of each response's tokens the loss reads
            lengths = batch.pairs.cu_seqlens.diff().float().clamp(min=1)
            metrics = {**metrics, "token_share": metrics["selected"].float() / lengths}
        return loss, metrics
