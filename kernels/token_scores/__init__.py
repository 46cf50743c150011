"""token_scores: per-token log-prob difference of two models in one pass, without their logits."""

from __future__ import annotations

import torch

from .. import checks
from ..streaming.logprobs import row_logprobs
from ..streaming.passes import Passes
from ..streaming.shard import split_head
from ..utils import unit_stride
from .naive import token_scores_naive


@torch.no_grad()
def token_scores(hidden_a: torch.Tensor, weight_a: torch.Tensor, hidden_b: torch.Tensor, weight_b: torch.Tensor,
                 targets: torch.Tensor, *, ignore_index: int = -100, backend: str = "auto",
                 process_group=None) -> torch.Tensor:
    """``log p_a(targets) - log p_b(targets)`` per token, from each model's last hidden states and lm_head.

    This is SePO's token reward (a = oracle, b = reference) and Selective-DPO's score (a = reference,
    b = policy). The two models may have different hidden sizes (a small oracle scoring for a larger
    policy) but must share the vocabulary.

    Args:
        hidden_a: [N, D_a] hidden states of model a; weight_a: [V, D_a] its output embedding.
        hidden_b: [N, D_b] hidden states of model b; weight_b: [V, D_b] its output embedding.
        targets: [N] token ids in [0, V) or ``ignore_index`` (those give exactly 0).
        backend: "auto", "triton", "torch" or "naive".
        process_group: both heads are sharded over this group along the vocabulary, the same rows on each
            process (as in ``linear_logprobs``); a DTensor weight_a gives its own group.

    Returns:
        [N] float32 scores (float64 for float64 inputs), not differentiable.
    """
    for name, t in (("hidden_a", hidden_a), ("weight_a", weight_a), ("hidden_b", hidden_b), ("weight_b", weight_b)):
        checks.check_float(name, t, 2)
    weight_a, shard = split_head(weight_a, process_group)
    weight_b, _ = split_head(weight_b, None if shard is None else shard.group)
    n = hidden_a.shape[0]
    if hidden_b.shape[0] != n:
        raise ValueError(f"hidden_b must have N={n} rows like hidden_a, got {hidden_b.shape[0]}")
    for h_name, h, w_name, w in (("hidden_a", hidden_a, "weight_a", weight_a),
                                 ("hidden_b", hidden_b, "weight_b", weight_b)):
        if w.shape[1] != h.shape[1]:
            raise ValueError(f"{w_name} must have shape [V, {h.shape[1]}] to match {h_name}, got {tuple(w.shape)}")
    if weight_a.shape[0] == 0:
        raise ValueError("weight_a must have at least one row (V >= 1)")
    if weight_b.shape[0] != weight_a.shape[0]:
        raise ValueError(f"weight_b must have the vocabulary size V={weight_a.shape[0]} of weight_a, "
                         f"got {weight_b.shape[0]}")
    checks.check_targets(targets, n, weight_a.shape[0] if shard is None else shard.vocab, ignore_index)
    checks.check_same_device(hidden_a=hidden_a, weight_a=weight_a, hidden_b=hidden_b, weight_b=weight_b,
                             targets=targets)
    checks.check_same_dtype(hidden_a=hidden_a, weight_a=weight_a, hidden_b=hidden_b, weight_b=weight_b)
    backend = checks.resolve("hidden_a", hidden_a, backend, shard)
    if backend == "naive":
        return token_scores_naive(hidden_a, weight_a, hidden_b, weight_b, targets, ignore_index)
    rows = torch.nonzero(targets != ignore_index).squeeze(1)  # the call's one host synchronisation
    t = targets.index_select(0, rows)
    passes = Passes(backend, 1.0, None)
    logp_a, _ = row_logprobs(passes, unit_stride(hidden_a), unit_stride(weight_a), None, rows, t, shard)
    logp_b, _ = row_logprobs(passes, unit_stride(hidden_b), unit_stride(weight_b), None, rows, t, shard)
    out = torch.zeros(n, dtype=logp_a.dtype, device=hidden_a.device)
    out[rows] = logp_a - logp_b
    return out


__all__ = ["token_scores", "token_scores_naive"]
