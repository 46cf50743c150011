"""Naive reference: one Python loop over the segments, sorting each one's valid tokens. The readable oracle."""

from __future__ import annotations

import torch


def topk_mask_naive(scores, cu_seqlens, k, largest, valid):
    """bool [N]: the ``k[s]`` best valid tokens of each segment s; ``k`` int64 [S], ``largest`` bool [S], ``valid``
    bool [N]."""
    values, bounds, is_valid, best_first = scores.tolist(), cu_seqlens.tolist(), valid.tolist(), largest.tolist()
    segments = [[i for i in range(start, end) if is_valid[i]] for start, end in zip(bounds[:-1], bounds[1:])]
    mask = [False] * len(values)
    for tokens, count, descending in zip(segments, k.tolist(), best_first):
        # Python floats compare -0.0 == 0.0, so equal scores fall through to the position.
        order = sorted(tokens, key=lambda i: (-values[i], i) if descending else (values[i], i))
        for i in order[:count]:
            mask[i] = True
    return torch.tensor(mask, dtype=torch.bool, device=scores.device)
