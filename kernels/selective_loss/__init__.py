"""linear_selective_loss: the trainer's hot path, from last hidden states to a selective loss and its gradients."""

from __future__ import annotations

import torch

from .. import checks
from ..backend import resolve_backend
from ..linear_logprobs import unit_stride
from ..losses import common
from ..streaming.fused_loss import AttachGradients, selective_loss_fused
from ..streaming.passes import Passes
from ..streaming.shard import split_head
from ..topk_mask import topk_mask
from .compact import compact_boundaries
from .losses import LOSSES, PAIRWISE, check_options
from .naive import selective_loss_naive


def linear_selective_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          cu_seqlens: torch.Tensor, *, mask: torch.Tensor | None = None,
                          scores: torch.Tensor | None = None, ratio: float | None = None,
                          largest: bool | torch.Tensor | None = None, loss: str = "sepo",
                          ref_logps: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                          softcap: float | None = None, backend: str = "auto", process_group=None, **loss_options):
    """A preference loss over selected response tokens, computed from hidden states without full logits.

    Log-probs are computed only for the tokens the loss reads: the selected ones. The loss and the gradients
    of hidden, weight and bias are formed in the same pass over chunks of complete pairs
    (``selpo.kernels.streaming.fused_loss``): three GEMMs over the selected rows, no logit computed twice;
    backward only scales the saved gradients. The torch and triton backends differ only in the memory-bound
    passes over each logits tile (PyTorch ops or Triton kernels).

    Tokens are selected by ``mask``, or by ``scores`` and ``ratio`` through ``topk_mask`` (per response,
    the top ``ratio`` of its tokens; ``largest`` defaults to True for chosen responses and False for
    rejected ones, SePO's rule). Tokens whose target is ``ignore_index`` are never selected. Without
    either, every valid token is selected (plain DPO or SimPO; for weighted_nll, every token with a
    non-zero weight).

    Args:
        hidden: [N, D] policy's last hidden states; weight: [V, D] its output embedding; bias: optional [V].
        targets: [N] next-token ids, or ``ignore_index``.
        cu_seqlens: int32 [S+1] response boundaries; for the pairwise losses the segments are
            chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}.
        mask: optional bool [N]: the selected tokens.
        scores, ratio, largest: select by ``topk_mask(scores, cu_seqlens, ratio, largest=...)`` instead.
        loss: "sepo" (``gamma``, ``margin``), "dpo" (``beta``; needs ``ref_logps``), "simpo" (``beta``,
            ``gamma``) or "weighted_nll" (needs ``weights``); options go in ``**loss_options``.
        ref_logps: [N] reference log-probs for "dpo" (treated as constants).
        weights: [N] token weights for "weighted_nll".
        temperature, softcap, ignore_index: as in ``linear_logprobs``.
        backend: "auto", "triton", "torch" or "naive" (the naive path builds full logits: the reference).
        process_group: the head is sharded over this group along the vocabulary, as in ``linear_logprobs``
            (a DTensor weight gives its own): every process computes the same loss; per chunk of pairs the
            log-probs are combined in two all-reduces of fp32 [rows] vectors and the hidden gradient in one of
            fp32 [rows, D]; each process keeps its shard's weight gradient.

    Returns:
        (loss, metrics): the 0-dim mean loss over pairs (or sequences for weighted_nll), differentiable
        w.r.t. hidden, weight and bias, and the loss's detached per-pair metrics plus "selected" [S],
        the number of selected tokens of each segment.
    """
    checks.check_float("hidden", hidden, 2)
    checks.check_float("weight", weight, 2)
    weight, shard = split_head(weight, process_group)
    n = hidden.shape[0]
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [V, D={hidden.shape[1]}], got {tuple(weight.shape)}")
    if bias is not None:
        checks.check_float("bias", bias, 1)
        checks.check_length("bias", bias, weight.shape[0], "V")
    checks.check_positive("temperature", temperature)
    if softcap is not None:
        checks.check_positive("softcap", softcap)
    checks.check_targets(targets, n, weight.shape[0] if shard is None else shard.vocab, ignore_index)
    checks.check_same_device(hidden=hidden, weight=weight, targets=targets, cu_seqlens=cu_seqlens)
    num_segments = checks.check_cu_seqlens(cu_seqlens, n)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    pairwise = loss in PAIRWISE
    if pairwise:
        checks.check_pairs(num_segments)
    elif num_segments == 0:
        raise ValueError("cu_seqlens holds no segment: a mean over zero sequences is undefined")
    if loss == "dpo":
        if ref_logps is None:
            raise ValueError("ref_logps is required for loss='dpo'")
        checks.check_float("ref_logps", ref_logps, 1)
        checks.check_length("ref_logps", ref_logps, n)
        ref_logps = ref_logps.detach()
    if loss == "weighted_nll":
        if weights is None:
            raise ValueError("weights is required for loss='weighted_nll'")
        checks.check_float("weights", weights, 1)
        checks.check_length("weights", weights, n)
    valid = targets != ignore_index
    if mask is not None and scores is not None:
        raise ValueError("give either mask or scores (with ratio), not both")
    if mask is not None:
        checks.check_mask("mask", mask, n)
        selected = mask & valid
    elif scores is not None:
        if ratio is None:
            raise ValueError("ratio is required with scores")
        if largest is None:
            chosen = num_segments // 2 if pairwise else num_segments
            largest = torch.arange(num_segments, device=hidden.device) < chosen
        selected = topk_mask(scores, cu_seqlens, ratio, largest=largest, valid=valid, backend=backend)
    else:
        selected = valid & (weights != 0) if loss == "weighted_nll" else valid
    if loss in ("sepo", "simpo"):
        common.token_counts(cu_seqlens, selected)  # a mean over no selected token: ValueError naming mask
    options = check_options(loss, loss_options)
    which = resolve_backend(backend, hidden.device)
    if which == "naive" and shard is not None:
        raise ValueError("process_group: the naive backend builds full logits on one process; use torch or triton")
    if which == "naive":
        value, metrics = selective_loss_naive(hidden, weight, targets, cu_seqlens, selected, loss, ref_logps, weights,
                                              bias, ignore_index, temperature, softcap, options)
        metrics["selected"] = compact_boundaries(selected, cu_seqlens).diff()
        return value, metrics
    if which == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden: the triton backend takes float32, bfloat16 or float16, got float64")
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    need = need if torch.is_grad_enabled() else (False, False, False)
    rows = torch.nonzero(selected).squeeze(1)
    cu_sel = compact_boundaries(selected, cu_seqlens)
    inputs = (None if t is None else unit_stride(t.detach()) for t in (hidden, weight, bias))
    loss_value, metrics, grads = selective_loss_fused(Passes(which, temperature, softcap), *inputs, targets,
                                                      cu_sel.tolist(), rows, loss, pairwise, ref_logps, weights,
                                                      options, need, shard)
    metrics["selected"] = cu_sel.diff()
    value = AttachGradients.apply(loss_value, grads, hidden, weight, bias) if any(need) else loss_value
    return value, metrics


__all__ = ["linear_selective_loss", "selective_loss_naive"]
