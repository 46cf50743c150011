"""Token-level guidance (arXiv 2306.00398), the reward model's side: a sequence's score aggregated from its
per-token rewards, and the Plackett-Luce loss that fits those scores to a ranking of K sequences.

A group's K sequences are laid out rank-major: of S = K * G segments, segment ``k * G + g`` is the k-th
best of group g. At K = 2 this is the pair layout of the other losses, chosen_0..chosen_{P-1},
rejected_0..rejected_{P-1}, and the Plackett-Luce loss is Bradley-Terry's.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import checks
from ..segment_sum import segment_sum_unchecked
from ..segment_sum.torch_ops import segment_ids
from ..utils import acc_dtype
from . import common

AGGREGATIONS = ("avg", "softmax", "softmin", "sum")


def sequence_scores(rewards: torch.Tensor, cu_seqlens: torch.Tensor, *, aggregation: str = "avg",
                    temperature: float = 2.0, scale: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """[S] score of each segment from its token rewards r_1..r_T, with C = ``scale[s]`` (1 when None):

    * ``"avg"``: ``C * (1/T) * sum_t r_t``
    * ``"softmax"``: ``C * temperature * log sum_t exp(r_t / temperature)``
    * ``"softmin"``: ``-C * temperature * log sum_t exp(-r_t / temperature)``
    * ``"sum"``: ``sum_t r_t``; ``scale`` is ignored (still checked): a sum already grows with the length,
      which C is there to supply to the other three.

    A mean or log-sum-exp over no token is undefined, so an empty segment is a ValueError naming
    cu_seqlens, except for "sum", where it scores 0. The log-sum-exps subtract each segment's max first,
    so no reward overflows exp.

    Args:
        rewards: [N] per-token rewards (float; fp64 on the torch and naive backends). The paper's lie in
            (0, 1]; any real is taken.
        cu_seqlens: int32 [S+1] segment boundaries.
        aggregation: "avg", "softmax", "softmin" or "sum".
        temperature: of the soft max / min (finite, > 0; checked whatever the aggregation).
        scale: optional [S] float C per segment, e.g. ``mean_lengths(cu_seqlens, num_groups)``.
        backend: "auto", "triton", "torch" or "naive", used for the per-segment sums.

    Returns:
        [S] scores, float32 (float64 for float64 rewards), differentiable w.r.t. rewards (and scale). A
        NaN reward (or scale) makes its own segment's score NaN, no other.
    """
    checks.check_float("rewards", rewards, 1)
    num_segments = checks.check_cu_seqlens(cu_seqlens, rewards.shape[0])
    if scale is not None:
        checks.check_float("scale", scale, 1)
        checks.check_length("scale", scale, num_segments, "S")
    checks.check_same_device(rewards=rewards, scale=scale, cu_seqlens=cu_seqlens)
    if not isinstance(aggregation, str) or aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    temperature = checks.check_real("temperature", temperature, positive=True)
    backend = checks.resolve("rewards", rewards, backend)
    counts = None if aggregation == "sum" else nonempty_counts(cu_seqlens, aggregation)
    acc = acc_dtype(rewards.dtype)
    values = rewards.to(acc)
    if aggregation == "sum":
        return segment_sum_unchecked(values, cu_seqlens, backend)
    if aggregation == "avg":
        scores = common.segment_mean(values, cu_seqlens, counts, backend)
    elif aggregation == "softmax":
        scores = soft_max(values, cu_seqlens, temperature, backend)
    else:
        scores = -soft_max(-values, cu_seqlens, temperature, backend)
    return scores if scale is None else scale.to(acc) * scores


def nonempty_counts(cu_seqlens: torch.Tensor, aggregation: str) -> torch.Tensor:
    """int64 [S] tokens per segment, all >= 1: an empty one raises a ValueError naming cu_seqlens."""
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    empty = torch.nonzero(counts == 0)
    if empty.numel():
        over = "mean" if aggregation == "avg" else "log-sum-exp"
        raise ValueError(f"cu_seqlens: segment {int(empty[0])} is empty; aggregation={aggregation!r} takes a "
                         f"{over} over its tokens")
    return counts


def soft_max(values: torch.Tensor, cu_seqlens: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    """[S] ``temperature * log sum exp(values / temperature)`` over each (non-empty) segment.

    Computed as ``m + temperature * log sum exp((values - m) / temperature)`` with m the segment's max:
    every exp is then <= 1 and the largest is 1, so the sum neither overflows nor underflows to 0. The
    identity holds for any constant m, so m is detached and the gradient is still exact.
    """
    ids = segment_ids(cu_seqlens, values.shape[0])
    top = torch.full((cu_seqlens.shape[0] - 1,), -math.inf, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, ids, values.detach(), "amax")
    # An infinite max is not subtracted (inf - inf is NaN where the true score is +-inf); NaN stays NaN.
    shift = top.masked_fill(torch.isinf(top), 0.0)
    sums = segment_sum_unchecked(torch.exp((values - shift[ids]) / temperature), cu_seqlens, backend)
    return shift + temperature * torch.log(sums)


def mean_lengths(cu_seqlens: torch.Tensor, num_groups: int) -> torch.Tensor:
    """float32 [S]: per segment, the mean length of the K sequences of its group, the paper's C.

    It brings a mean (or soft max / min) of token rewards back to the size of a sum over a sequence of
    typical length, with one factor for all the sequences that are compared, so it shifts no ranking.
    Segments are rank-major (segment ``k * G + g`` belongs to group g); S must be a multiple of
    ``num_groups`` = G.
    """
    # cu_seqlens is checked against its own end: there are no tokens here to count.
    given = isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dtype == torch.int32 and cu_seqlens.numel()
    num_segments = checks.check_cu_seqlens(cu_seqlens, int(cu_seqlens.reshape(-1)[-1]) if given else 0)
    k = group_size(num_segments, num_groups, "cu_seqlens", 1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float64)
    return lengths.reshape(k, -1).mean(0).repeat(k).to(torch.float32)


def group_size(num_segments: int, num_groups: int, name: str, minimum: int) -> int:
    """K = S / num_groups, after checking num_groups, that it divides S, and that K >= ``minimum``."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    num_groups = int(num_groups)
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if num_segments % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the S={num_segments} sequences of {name} "
                         "(K ranked sequences per group, rank-major)")
    k = num_segments // num_groups
    if k < minimum:
        raise ValueError(f"{name} must hold at least {minimum} ranked sequence(s) per group, S = K * num_groups; "
                         f"got S={num_segments} for num_groups={num_groups}, K={k}")
    return k


def plackett_luce_loss(scores: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over groups of ``-sum_{k=0}^{K-2} log(exp(e_k) / sum_{j>=k} exp(e_j))``, e_0 the best's score.

    The likelihood of the group's ranking when each place is drawn in turn, softmax-wise, from the
    sequences not placed yet (the last place, k = K-1, has probability 1). At K = 2 it is Bradley-Terry,
    ``-logsigmoid(e_0 - e_1)``.

    Args:
        scores: [S] float sequence scores, S = K * num_groups with K >= 2, rank-major: ``scores[k * G + g]``
            is the k-th best sequence of group g (e.g. ``sequence_scores`` of the ranked responses).
        num_groups: G >= 1.

    Returns:
        (loss, metrics): the 0-dim mean loss (float32, float64 for float64 scores), differentiable w.r.t.
        scores, and detached [G] tensors "chosen_reward" (e_0), "rejected_reward" (e_{K-1}), "margin"
        (e_0 - e_1) and "accuracy" (1.0 where e_0 is strictly above every other score of its group, else
        0.0; a NaN counts as 0.0). A NaN score makes the loss NaN.
    """
    checks.check_float("scores", scores, 1)
    k = group_size(scores.shape[0], num_groups, "scores", 2)
    acc = acc_dtype(scores.dtype)
    ranked = scores.to(acc).reshape(k, -1).t()  # [G, K], best first
    # log sum_{j >= k} exp(e_j) for every k at once: a log-cumsum-exp from the worst end, stable at any scale.
    tails = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)
    loss = (tails[:, :-1] - ranked[:, :-1]).sum(1).mean()
    # A copy: for scores already in the output dtype, ranked is a view of the caller's tensor.
    e = ranked.detach().clone()
    metrics = {
        "chosen_reward": e[:, 0],
        "rejected_reward": e[:, -1],
        "margin": e[:, 0] - e[:, 1],
        "accuracy": (e[:, :1] > e[:, 1:]).all(1).to(acc),
    }
    return loss, metrics
