"""Naive reference: builds the full [N, V] logits. The test oracle and the benchmark baseline."""

from __future__ import annotations

import torch

from ..utils import acc_dtype


def linear_logprobs_naive(hidden, weight, targets, bias=None, ignore_index=-100, temperature=1.0, softcap=None):
    """``log_softmax(softcap(hidden @ weight.T + bias) / temperature)[targets]``; 0 where targets == ignore_index.

    Written as a user would (logits -> log_softmax -> gather), with no work for options left at their
    defaults, so that as a baseline it is fair.
    """
    dtype = acc_dtype(hidden.dtype)
    logits = (hidden @ weight.T).to(dtype)
    if bias is not None:
        logits = logits + bias.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    keep = targets != ignore_index
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.where(keep, targets, 0).long()[:, None]).squeeze(1)
    return torch.where(keep, logp, torch.zeros((), dtype=dtype, device=logp.device))
