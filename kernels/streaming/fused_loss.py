"""The selective loss with its gradients formed in the forward, over chunks of complete pairs.

A pairwise loss couples the tokens of a pair only through the pair's own reward, so once a chunk holds
every selected token of its pairs, the loss of those pairs and dL/dlogp of their tokens are known while
their logits are still in the buffer. Per chunk: one GEMM writes the selected rows' logits over the whole
vocabulary, a pass folds their log-sum-exps, the loss's closed-form dL/dlogp comes from the [rows] log-probs
(the loss the caller hands in, e.g. ``selective_loss.compact.CompactLoss``: a few small kernels), a pass turns
the logits into dL/dlogits in place, and two GEMMs take that to dL/dweight (added over the chunks, in fp32 for a
half weight) and dL/dhidden. Three GEMMs over the
selected rows, nothing over the others, nothing recomputed; ``AttachGradients`` hands the saved gradients to
autograd, scaled by the upstream gradient.
"""

from __future__ import annotations

import functools

import torch

from .. import ledger
from ..utils import acc_dtype
from . import launch, plan
from .logprobs import flat_view, shard_targets
from .passes import Passes


def unit_groups(units_rows: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive groups [a, b) of units (pairs or sequences) holding at most ``limit`` rows, or one unit."""
    groups, start, total = [], 0, 0
    for u, rows in enumerate(units_rows):
        if u > start and total + rows > limit:
            groups.append((start, u))
            start, total = u, 0
        total += rows
    if units_rows:
        groups.append((start, len(units_rows)))
    return groups


@ledger.scoped
def selective_loss_fused(passes: Passes, hidden, weight, bias, targets, cu_sel, rows, pairwise, start_loss,
                         need_grads, shard=None):
    """(loss, metrics, (grad_hidden, grad_weight, grad_bias)) of the loss over the selected rows ``rows``
    (sorted indices into hidden), whose segments are bounded by ``cu_sel`` (a list of ints, [S+1]); ``pairwise``:
    the segments are pairs (chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}), else independent sequences. With
    a ``shard``, weight and bias are this process's vocabulary shard: the log-probs are combined over the
    processes before the loss, and each chunk's hidden gradient is summed over them (in fp32).

    ``start_loss(seg_rows, chunks, order)`` starts the loss for this call's chunks (``seg_rows``: the rows of
    each segment; ``chunks``: each chunk's segments in the order its rows are laid out; ``order``: the rows in
    that order). It returns an object with ``rows`` (each chunk's [r0, r1) in that order), ``grad_(k, logp)``
    (folds chunk k's log-probs, returns dL/dlogp or None) and ``result()`` (loss, metrics).

    The rows are put in chunk order once per call (one gather of their indices and targets; the loss gathers
    its inputs), and the loss's boundaries reach the device in one copy, so no chunk copies from the host
    (which would synchronise a GPU's stream). A half weight's gradient is summed over the chunks in an fp32
    accumulator (where it fits the buffer's budget) and rounded once at the end."""
    (v, d), dtype = weight.shape, hidden.dtype
    seg_rows = [b - a for a, b in zip(cu_sel[:-1], cu_sel[1:])]
    num_units = len(seg_rows) // 2 if pairwise else len(seg_rows)
    # A unit's segments: (p, P + p) for a pair, (s,) for a sequence.
    units_rows = [seg_rows[u] + seg_rows[num_units + u] for u in range(num_units)] if pairwise else seg_rows
    budget = plan.buffer_bytes(hidden.device, plan.LOSS_BUFFER_BYTES)
    limit = plan.pair_chunk_rows(v, hidden.element_size(), budget)
    groups = unit_groups(units_rows, limit)
    # Each chunk's segments, in the order its rows are laid out.
    spans = [[(a, b), (num_units + a, num_units + b)] if pairwise else [(a, b)] for a, b in groups]
    order = torch.cat([rows[cu_sel[s]:cu_sel[e]] for parts in spans for s, e in parts])
    need_h, need_w, need_b = need_grads
    chunks = [[u for s, e in parts for u in range(s, e)] for parts in spans]
    loss_fn = start_loss(seg_rows, chunks, order)
    most = min(rows.numel(), max(limit, max(units_rows, default=0)))
    buf = ledger.workspace((most * v,), dtype, hidden.device, name="logits")
    hbuf = ledger.workspace((most, d), dtype, hidden.device, name="rows")
    dh = None if shard is None else ledger.workspace((most, d), acc_dtype(dtype), hidden.device, name="grad_rows")
    any_row = rows.numel() > 0

    def output(t, needed, zero):
        return ledger.workspace(t.shape, t.dtype, t.device, fill=0.0 if zero else None, output=True) if needed else None

    grads = (output(hidden, need_h, True), output(weight, need_w, not any_row), output(bias, need_b, not any_row))
    # Summing a half weight's gradient in its own dtype rounds every chunk's sum to it: an fp32 accumulator
    # takes it where it fits the buffer's budget, so the workspace stays flat in the vocabulary (SmolLM2's
    # head, 113 MB in fp32, is summed there; Llama-3-8B's, 2 GiB, is not).
    wide = (need_w and len(groups) > 1 and weight.dtype != acc_dtype(weight.dtype)
            and weight.numel() * 4 <= budget)
    gw = ledger.workspace(weight.shape, acc_dtype(weight.dtype), weight.device) if wide else grads[1]
    t_all, clamped_all, inside_all = shard_targets(targets.index_select(0, order), shard)
    for k, (r0, r1) in enumerate(loss_fn.rows):
        r, idx = r1 - r0, order[r0:r1]
        t, clamped = t_all[r0:r1], clamped_all[r0:r1]
        h = launch.gather_rows(hidden, idx, hbuf[:r])
        x = launch.logits(h, weight, flat_view(buf, r, v))
        x_t = passes.target_logits(hidden, idx, weight, bias, clamped)
        passes.logprobs_and_grad_(x, bias, t, x_t, functools.partial(loss_fn.grad_, k),
                                  None if shard is None else functools.partial(shard.combine,
                                                                               inside=inside_all[r0:r1]))
        if any(need_grads):
            if need_w:
                launch.grad_weight(x, h, gw, accumulate=k > 0)
            if need_b:
                launch.column_sums(x, grads[2], accumulate=k > 0)
            if need_h and shard is None:  # h is no longer needed: its buffer takes the rows' hidden gradient
                launch.grad_hidden(x, weight, h, accumulate=False)
                launch.scatter_rows(h, idx, grads[0])
            elif need_h:
                launch.grad_hidden(x, weight, dh[:r], accumulate=False)
                launch.scatter_rows(shard.all_reduce(dh[:r]), idx, grads[0])
    if wide:
        launch.cast(gw, grads[1])
    loss, metrics = loss_fn.result()
    return loss, metrics, grads


class AttachGradients(torch.autograd.Function):
    """Returns a loss whose gradients w.r.t. (hidden, weight, bias) were computed with it, scaled on backward
    in place (one pass over them, no new allocation): they are handed over once."""

    @staticmethod
    def forward(ctx, loss, grads, hidden, weight, bias):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_selective_loss: its gradients were handed over by the first backward; "
                               "compute the loss again to differentiate it again")
        for g in ctx.grads:
            if g is not None:
                ledger.record_pass("scale_grads", (g,), (g,))
                if ledger.executing():
                    g.mul_(grad_loss.to(g.dtype))
        grads, ctx.grads = ctx.grads, None
        return (None, None, *grads)
