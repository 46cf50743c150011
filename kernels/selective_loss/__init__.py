"""linear_selective_loss: the trainer's hot path, from last hidden states to a selective loss and its gradients."""

from __future__ import annotations

import functools

import torch

from .. import checks
from ..losses import common
from ..losses.spec import FusedLoss, lookup
from ..streaming.fused_loss import AttachGradients, selective_loss_fused
from ..streaming.passes import Passes
from ..topk_mask import topk_mask
from ..utils import acc_dtype, selected_bounds, unit_stride
from .compact import CompactLoss
from .naive import selective_loss_naive


def linear_selective_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          cu_seqlens: torch.Tensor, *, mask: torch.Tensor | None = None,
                          scores: torch.Tensor | None = None, ratio: float | None = None,
                          largest: bool | torch.Tensor | None = None, loss: str = "sepo",
                          bias: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                          softcap: float | None = None, backend: str = "auto", process_group=None, **loss_args):
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
            ``gamma``), "weighted_nll" (needs ``weights``), or any loss registered by ``losses.register``.
        **loss_args: the loss's options (numbers) and its per-token inputs ([N] float tensors, treated as
            constants): ``ref_logps``, the reference log-probs of "dpo"; ``weights``, the token weights of
            "weighted_nll".
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
    weight, shard = checks.check_head(hidden, weight, targets, bias, ignore_index, temperature, softcap,
                                      process_group)
    n = hidden.shape[0]
    num_segments = checks.check_cu_seqlens(cu_seqlens, n)
    checks.check_same_device(hidden=hidden, cu_seqlens=cu_seqlens)
    spec = lookup(loss)
    if spec.pairwise:
        checks.check_pairs(num_segments)
    elif num_segments == 0:
        raise ValueError("cu_seqlens holds no segment: a mean over zero sequences is undefined")
    inputs = loss_inputs(spec, loss_args, hidden)
    selected = select_tokens(spec, inputs, targets != ignore_index, cu_seqlens, mask, scores, ratio, largest, backend)
    if spec.mean:
        common.token_counts(cu_seqlens, selected)  # a mean over no selected token: ValueError naming mask
    options = spec.check_options(loss_args)
    backend = checks.resolve("hidden", hidden, backend, shard)
    bounds = selected_bounds(selected, cu_seqlens)
    if backend == "naive":
        value, metrics = selective_loss_naive(spec, hidden, weight, targets, cu_seqlens, selected, inputs, options,
                                              bias, ignore_index, temperature, softcap)
        metrics["selected"] = bounds.diff()
        return value, metrics
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    need = need if torch.is_grad_enabled() else (False, False, False)
    rows = torch.nonzero(selected).squeeze(1)
    start_loss = functools.partial(CompactLoss, spec, options, inputs, backend, acc_dtype(hidden.dtype), any(need))
    head = (None if t is None else unit_stride(t.detach()) for t in (hidden, weight, bias))
    loss_value, metrics, grads = selective_loss_fused(Passes(backend, temperature, softcap), *head, targets,
                                                      bounds.tolist(), rows, spec.pairwise, start_loss, need, shard)
    metrics["selected"] = bounds.diff()
    value = AttachGradients.apply(loss_value, grads, hidden, weight, bias) if any(need) else loss_value
    return value, metrics


def loss_inputs(spec: FusedLoss, loss_args: dict, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-token inputs ``spec`` reads, taken out of ``loss_args`` and checked (float [N], on hidden's
    device), detached: the loss treats them as constants."""
    inputs = {}
    for name in spec.inputs:
        t = loss_args.pop(name, None)
        if t is None:
            raise ValueError(f"{name} is required for loss={spec.name!r}")
        checks.check_float(name, t, 1)
        checks.check_length(name, t, hidden.shape[0])
        checks.check_same_device(hidden=hidden, **{name: t})
        inputs[name] = t.detach()
    return inputs


def select_tokens(spec: FusedLoss, inputs: dict, valid, cu_seqlens, mask, scores, ratio, largest,
                  backend) -> torch.Tensor:
    """bool [N]: the valid tokens the loss reads: ``mask``'s, the top ``ratio`` by ``scores`` (``largest``
    defaults to True for chosen responses, False for rejected ones), or else those ``spec.reads``."""
    if mask is not None and scores is not None:
        raise ValueError("give either mask or scores (with ratio), not both")
    if mask is not None:
        checks.check_mask("mask", mask, valid.shape[0])
        return mask & valid
    if scores is not None:
        if ratio is None:
            raise ValueError("ratio is required with scores")
        if largest is None:
            num_segments = cu_seqlens.shape[0] - 1
            chosen = num_segments // 2 if spec.pairwise else num_segments
            largest = torch.arange(num_segments, device=valid.device) < chosen
        return topk_mask(scores, cu_seqlens, ratio, largest=largest, valid=valid, backend=backend)
    return valid if spec.reads is None else valid & spec.reads(**inputs)


__all__ = ["linear_selective_loss", "selective_loss_naive"]
