"""Naive reference: log_softmax over the full logits by plain autograd. The test oracle and the benchmark baseline."""

from __future__ import annotations

import torch

from ..utils import acc_dtype


def logprobs_from_logits_naive(logits, targets, ignore_index=-100, temperature=1.0):
    """``log_softmax(logits / temperature)[targets]``; 0 where targets == ignore_index.

    Only the kept rows enter the log_softmax, so an ignored row gives exactly 0 and no gradient even when it
    holds nan or inf.
    """
    dtype = acc_dtype(logits.dtype)
    keep = targets != ignore_index
    x = logits[keep].to(dtype) / temperature
    picked = torch.log_softmax(x, dim=-1).gather(1, targets[keep].long()[:, None]).squeeze(1)
    return torch.zeros(logits.shape[0], dtype=dtype, device=logits.device).masked_scatter(keep, picked)
