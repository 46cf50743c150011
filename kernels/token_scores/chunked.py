"""Chunked PyTorch path: both models' log-probs of one group of rows stream through one logits buffer."""

import torch

from ..linear_logprobs.chunked import ROW_GROUP, Head, block_cols


def token_scores_chunked(hidden_a, weight_a, hidden_b, weight_b, targets, ignore_index=-100):
    head_a = Head(weight_a, None, 1.0, None)
    head_b = Head(weight_b, None, 1.0, None)
    scores = torch.zeros(hidden_a.shape[0], dtype=head_a.acc_dtype, device=hidden_a.device)
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    group = min(ROW_GROUP, max(rows.numel(), 1))
    buf = head_a.buffer(group, block_cols(group, weight_a.shape[0]))  # same V and dtype: shared by both heads
    for idx in rows.split(group):
        t = targets.index_select(0, idx)
        logp_a = head_a.logprobs(hidden_a.index_select(0, idx), t, buf)[0]
        scores[idx] = logp_a - head_b.logprobs(hidden_b.index_select(0, idx), t, buf)[0]
    return scores
