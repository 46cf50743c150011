"""Fused torch path: the loss and both gradients in one pass over chunks of complete pairs.

A pairwise loss couples the tokens of a pair only through the pair's own reward, so once a chunk holds
every selected token of its pairs, the loss of those pairs and dL/dlogp of their tokens are known while
their logits are still in the buffer. The gradient is formed from that buffer at once: each selected
token costs three matmuls (logits, dL/dhidden, dL/dweight) and nothing is recomputed; tokens outside
the selection cost nothing. Memory: one [rows, V] buffer, rows = max(chunk size, most selected tokens
of any one pair).
"""

from __future__ import annotations

import torch

from ..linear_logprobs.chunked import Head, cast_gradients, chunk_rows, gradient_buffers
from .compact import compact_boundaries
from .losses import apply_loss


def unit_groups(units_rows: torch.Tensor, limit: int) -> list[tuple[int, int]]:
    """Consecutive groups [a, b) of units (pairs or sequences) holding at most ``limit`` rows, or one unit."""
    groups, start, total = [], 0, 0
    for u, rows in enumerate(units_rows.tolist()):
        if u > start and total + rows > limit:
            groups.append((start, u))
            start, total = u, 0
        total += rows
    if units_rows.numel():
        groups.append((start, units_rows.numel()))
    return groups


def selective_loss_fused(hidden, weight, targets, cu_seqlens, selected, name, pairwise, ref_logps, weights,
                         bias, temperature, options, need_grads):
    """(loss, metrics, (grad_hidden, grad_weight, grad_bias)) of the loss over the ``selected`` tokens."""
    rows = torch.nonzero(selected).squeeze(1)
    cu_sel = compact_boundaries(selected, cu_seqlens)
    seg_rows = cu_sel[1:] - cu_sel[:-1]
    num_segments = seg_rows.numel()
    num_units = num_segments // 2 if pairwise else num_segments
    # A unit's segments: (p, P + p) for a pair, (s,) for a sequence.
    units_rows = seg_rows[:num_units] + seg_rows[num_units:] if pairwise else seg_rows
    limit = chunk_rows(weight.shape[0])
    head = Head(weight, bias, temperature, None)
    buf = head.buffer(max(limit, int(units_rows.max()) if num_units else 1), weight.shape[0])
    acc_h_buf = torch.empty(buf.shape[0], hidden.shape[1], dtype=head.acc_dtype, device=hidden.device)
    grads = gradient_buffers(hidden, weight, bias, *need_grads, head.acc_dtype)
    losses, metrics = [], []
    for a, b in unit_groups(units_rows, limit):
        parts = [(a, b), (num_units + a, num_units + b)] if pairwise else [(a, b)]
        idx = torch.cat([rows[cu_sel[s]:cu_sel[e]] for s, e in parts])
        counts = torch.cat([seg_rows[s:e] for s, e in parts])
        sub_cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
        sub_cu[1:] = counts.cumsum(0)
        h, t = hidden.index_select(0, idx), targets.index_select(0, idx)
        with torch.no_grad():
            logp, _, e, sums = head.logprobs(h, t, buf)  # one block spans the vocabulary: e stays in buf
        logp = logp.detach().requires_grad_()
        with torch.enable_grad():
            loss, chunk_metrics = apply_loss(
                name, logp, sub_cu, torch.ones_like(t, dtype=torch.bool),
                None if ref_logps is None else ref_logps.index_select(0, idx),
                None if weights is None else weights.index_select(0, idx), "torch", options)
            share = (b - a) / num_units  # the loss is a mean over units: this chunk's share of it
            weighted = loss * share
        losses.append(weighted.detach())
        metrics.append(chunk_metrics)
        if any(need_grads):
            (g,) = torch.autograd.grad(weighted, logp)
            g = g / head.temperature
            # softmax = e / sums, so |g/T| * softmax is e scaled per row: one in-place pass.
            e.mul_((g.abs() / sums)[:, None])
            sign = torch.sign(g)
            acc_h = acc_h_buf[:idx.numel()].zero_()
            head.add_block_grads(e, 0, -sign, h.to(head.acc_dtype) * -sign[:, None], (acc_h, grads[1], grads[2]))
            head.finish_grads(acc_h, h, t, g, sign, grads, idx)
    loss = torch.stack(losses).sum()
    merged = {k: torch.cat([m[k] for m in metrics]) for k in metrics[0]}
    return loss, merged, cast_gradients(grads, weight, bias)


class AttachGradients(torch.autograd.Function):
    """Returns a loss whose gradients w.r.t. (hidden, weight, bias) were computed with it, scaled on backward."""

    @staticmethod
    def forward(ctx, loss, grads, hidden, weight, bias):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads]
        return (None, None, *scaled)
