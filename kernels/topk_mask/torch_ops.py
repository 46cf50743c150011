"""PyTorch path, the default on CPU: two stable sorts instead of a loop over segments.

The first sort orders all tokens by a key that puts each segment's best token first (the score for
'smallest' segments, its negation for 'largest' ones); being stable, equal keys keep the lower position
first. The second, stable, sort groups the tokens by segment (invalid tokens into an extra last bucket)
and keeps that order inside each group, so a token's rank in its segment is its sorted position minus
the start of its group, and it is selected when its rank is below the segment's k.
"""

from __future__ import annotations

import torch

from ..utils import selected_bounds


def topk_mask(scores, cu_seqlens, k, largest, valid):
    """bool [N]: the ``k[s]`` best valid tokens of each segment s; ``k`` int64 [S], ``largest`` bool [S], ``valid``
    bool [N]."""
    n, num_segments = scores.shape[0], largest.shape[0]
    device = scores.device
    segment = torch.repeat_interleave(torch.arange(num_segments, device=device), cu_seqlens.diff(),
                                      output_size=n)
    # Negation is exact; adding 0.0 turns -0.0 into 0.0 so that a sort comparing bit patterns sees them equal.
    # Invalid tokens (whose scores may be nan) get key 0: they end in the extra bucket anyway.
    key = torch.where(largest[segment], -scores, scores) + 0.0
    key = torch.where(valid, key, torch.zeros((), dtype=key.dtype, device=device))
    order = torch.sort(key, stable=True).indices
    bucket = torch.where(valid, segment, num_segments)[order]
    bucket, regroup = torch.sort(bucket, stable=True)
    order = order[regroup]

    n_valid = selected_bounds(valid, cu_seqlens).diff()
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    k = torch.cat([k, zero])  # the invalid bucket selects nothing
    group_start = torch.cat([zero, n_valid.cumsum(0)])
    rank = torch.arange(n, device=device) - group_start[bucket]
    mask = torch.empty(n, dtype=torch.bool, device=device)
    mask[order] = rank < k[bucket]
    return mask
