"""The selective loss with its gradients formed in the forward, over chunks of complete pairs.

A pairwise loss couples the tokens of a pair only through the pair's own reward, so once a chunk holds
every selected token of its pairs, the loss of those pairs and dL/dlogp of their tokens are known while
their logits are still in the buffer. Per chunk: one GEMM writes the selected rows' logits over the whole
vocabulary, a pass folds their log-sum-exps, the loss and dL/dlogp come from the [rows] log-probs, a pass
turns the logits into dL/dlogits in place, and two GEMMs take that to dL/dweight (added over the chunks, in
the weight's dtype) and dL/dhidden. Three GEMMs over the selected rows, nothing over the others, nothing
recomputed; ``AttachGradients`` hands the saved gradients to autograd, scaled by the upstream gradient.
"""

from __future__ import annotations

import functools

import torch

from .. import ledger
from ..dtypes import acc_dtype
from ..selective_loss.losses import selected_loss
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
def selective_loss_fused(passes: Passes, hidden, weight, bias, targets, cu_sel, rows, name, pairwise, ref_logps,
                         weights, options, need_grads, shard=None):
    """(loss, metrics, (grad_hidden, grad_weight, grad_bias)) of the loss over the selected rows ``rows``
    (sorted indices into hidden), whose segments are bounded by ``cu_sel`` (a list of ints, [S+1]). With a
    ``shard``, weight and bias are this process's vocabulary shard: the log-probs are combined over the
    processes before the loss, and each chunk's hidden gradient is summed over them (in fp32)."""
    (v, d), dtype = weight.shape, hidden.dtype
    seg_rows = [b - a for a, b in zip(cu_sel[:-1], cu_sel[1:])]
    num_units = len(seg_rows) // 2 if pairwise else len(seg_rows)
    # A unit's segments: (p, P + p) for a pair, (s,) for a sequence.
    units_rows = [seg_rows[u] + seg_rows[num_units + u] for u in range(num_units)] if pairwise else seg_rows
    limit = plan.pair_chunk_rows(v, hidden.element_size(), plan.buffer_bytes(hidden.device, plan.LOSS_BUFFER_BYTES))
    most = min(rows.numel(), max(limit, max(units_rows, default=0)))
    buf = ledger.workspace((most * v,), dtype, hidden.device, name="logits")
    hbuf = ledger.workspace((most, d), dtype, hidden.device, name="rows")
    dh = None if shard is None else ledger.workspace((most, d), acc_dtype(dtype), hidden.device, name="grad_rows")
    need_h, need_w, need_b = need_grads
    any_row = rows.numel() > 0

    def output(t, needed, zero):
        return ledger.workspace(t.shape, t.dtype, t.device, fill=0.0 if zero else None, output=True) if needed else None

    grads = (output(hidden, need_h, True), output(weight, need_w, not any_row), output(bias, need_b, not any_row))
    losses, metrics = [], []

    def loss_grad(chunk, logp):
        """The chunk's loss (kept, with its metrics) and its gradient w.r.t. the rows' log-probs (None if none
        is wanted)."""
        sub_cu, counts, ref, w, share = chunk
        logp = logp.detach().requires_grad_()
        with torch.enable_grad():
            loss, chunk_metrics = selected_loss(name, logp, sub_cu, counts, ref, w, passes.which, options)
            weighted = loss * share
        losses.append(weighted.detach())
        metrics.append(chunk_metrics)
        return torch.autograd.grad(weighted, logp)[0] if any(need_grads) else None

    for a, b in unit_groups(units_rows, limit):
        parts = [(a, b), (num_units + a, num_units + b)] if pairwise else [(a, b)]
        idx = torch.cat([rows[cu_sel[s]:cu_sel[e]] for s, e in parts])
        counts = [n for s, e in parts for n in seg_rows[s:e]]
        sub_cu = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(hidden.device)
        counts = torch.tensor(counts, dtype=torch.int64).to(hidden.device)
        r = idx.numel()
        t, clamped, inside = shard_targets(targets.index_select(0, idx), shard)
        h = launch.gather_rows(hidden, idx, hbuf[:r])
        x = launch.logits(h, weight, flat_view(buf, r, v))
        x_t = passes.target_logits(hidden, idx, weight, bias, clamped)
        share = (b - a) / num_units  # the loss is a mean over units: this chunk's share of it
        chunk = (sub_cu, counts, None if ref_logps is None else ref_logps.index_select(0, idx),
                 None if weights is None else weights.index_select(0, idx), share)
        passes.logprobs_and_grad_(x, bias, t, x_t, functools.partial(loss_grad, chunk),
                                  None if shard is None else functools.partial(shard.combine, inside=inside))
        if any(need_grads):
            first = a == 0
            if need_w:
                launch.grad_weight(x, h, grads[1], accumulate=not first)
            if need_b:
                launch.column_sums(x, grads[2], accumulate=not first)
            if need_h and shard is None:  # h is no longer needed: its buffer takes the rows' hidden gradient
                launch.grad_hidden(x, weight, h, accumulate=False)
                launch.scatter_rows(h, idx, grads[0])
            elif need_h:
                launch.grad_hidden(x, weight, dh[:r], accumulate=False)
                launch.scatter_rows(shard.all_reduce(dh[:r]), idx, grads[0])
    loss = torch.stack(losses).sum()
    merged = {k: torch.cat([m[k] for m in metrics]) for k in metrics[0]}
    return loss, merged, grads


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
