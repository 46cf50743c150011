"""Chunked PyTorch path: both models' log-probs of one chunk of rows share one logits buffer."""

import torch

from ..linear_logprobs.chunked import Head


def token_scores_chunked(hidden_a, weight_a, hidden_b, weight_b, targets, ignore_index=-100):
    head_a = Head(weight_a, None, 1.0, None)
    head_b = Head(weight_b, None, 1.0, None)
    head_b.logits = head_a.logits  # same V and accumulation dtype: one buffer serves both heads
    if head_a.half_logits is not None:
        head_b.half_logits = head_a.half_logits
    scores = torch.zeros(hidden_a.shape[0], dtype=head_a.acc_dtype, device=hidden_a.device)
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    for idx in rows.split(head_a.rows):
        t = targets.index_select(0, idx)
        logp_a = head_a.logprobs(hidden_a.index_select(0, idx), t)[0]
        scores[idx] = logp_a - head_b.logprobs(hidden_b.index_select(0, idx), t)[0]
    return scores
