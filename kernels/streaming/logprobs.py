"""Per-row log-probs and their gradients under a linear head, cut into GEMM tiles by ``plan``.

Forward: each row's target logit is an exact fp32 dot product (``target_logits``); its log-sum-exp is
folded tile by tile (``merge_lse_``) from logits a GEMM writes into the reused buffer. Backward: per
vocabulary slice, one GEMM recomputes the logits of every row with gradient, ``grad_logits_`` turns them
into dL/dlogits in place, and two GEMMs take that to the slice's rows of dL/dweight (written once) and to its
share of dL/dhidden (summed in fp32 over the slices). Four GEMMs in all, no [N, V] or fp32 [V, D] buffer.

Rows are given as an index vector (sorted, distinct) with their targets; ``rows`` covering all of
``hidden`` means no gather.
"""

from __future__ import annotations

import torch

from .. import ledger
from ..utils import acc_dtype
from . import launch, plan
from .passes import Passes, finish_lse


def flat_view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view at the start of a flat buffer."""
    return buf[:rows * cols].view(rows, cols) if ledger.executing() else ledger.dry_input((rows, cols), buf.dtype,
                                                                                           buf.device)


def hidden_rows(hidden, rows, r0, r1, hbuf):
    """hidden[rows[r0:r1]]: a slice of hidden when rows are all of it, else gathered into hbuf."""
    if rows.numel() == hidden.shape[0]:
        return hidden[r0:r1]
    return launch.gather_rows(hidden, rows[r0:r1], hbuf[:r1 - r0])


def bias_slice(bias, v0, v1):
    return None if bias is None else bias[v0:v1]


def shard_targets(targets, shard):
    """(the targets as columns of the head given, clamped into it for the target-logit pass; whether each lies in
    it, or None without a shard)."""
    if shard is None:
        return targets, targets, None
    local, inside = shard.local_targets(targets)
    return local, local.clamp(0, shard.size - 1), inside


@ledger.scoped
def row_logprobs(passes: Passes, hidden, weight, bias, rows, targets, shard=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [n], lse [n]) of rows ``rows`` of hidden with targets ``targets`` [n]; with a ``shard``
    (``shard.VocabShard``), weight and bias are this process's vocabulary shard and the result is the whole
    vocabulary's."""
    n, (v, d) = rows.numel(), weight.shape
    acc = acc_dtype(hidden.dtype)
    _, clamped, inside = shard_targets(targets, shard)
    x_t = passes.target_logits(hidden, rows, weight, bias, clamped)
    m = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
    s = torch.zeros(n, dtype=acc, device=hidden.device)
    chunk, width = plan.forward_tiles(n, v, hidden.element_size(), plan.buffer_bytes(hidden.device))
    buf = ledger.workspace((min(chunk, n) * width,), hidden.dtype, hidden.device, name="logits")
    hbuf = None if n == hidden.shape[0] else ledger.workspace((min(chunk, n), d), hidden.dtype, hidden.device,
                                                               name="rows")
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        h = hidden_rows(hidden, rows, r0, r1, hbuf)
        for v0, v1 in plan.slices(v, width):
            x = launch.logits(h, weight[v0:v1], flat_view(buf, r1 - r0, v1 - v0))
            passes.merge_lse_(x, bias_slice(bias, v0, v1), m[r0:r1], s[r0:r1], keep=False)
    if shard is None:
        lse = finish_lse(m, s)
    else:
        lse, x_t = shard.combine(m, s, x_t, inside)
    return x_t - lse, lse


@ledger.scoped
def row_grads(passes: Passes, g, hidden, weight, bias, rows, targets, lse, grads, shard=None) -> None:
    """Adds the gradients of sum(g * logp) over rows ``rows`` into ``grads`` = (grad_hidden [N, D] zeroed,
    grad_weight [V, D], grad_bias [V]; None where not needed). ``g``, ``targets``, ``lse``: [n], the rows' own.
    grad_weight and grad_bias are written whole (no need to zero them) when there is a row. With a ``shard``,
    weight, bias and their gradients are this process's shard, and the hidden gradient is summed over the
    processes (in fp32)."""
    targets, _, _ = shard_targets(targets, shard)
    grad_hidden, grad_weight, grad_bias = grads
    n, (v, d) = rows.numel(), weight.shape
    dtype = hidden.dtype
    group, width = plan.backward_groups(n, v, hidden.element_size(), plan.buffer_bytes(hidden.device))
    all_rows = n == hidden.shape[0]
    buf = ledger.workspace((min(group, n) * width,), dtype, hidden.device, name="logits")
    hbuf = None if all_rows else ledger.workspace((min(group, n), d), dtype, hidden.device, name="rows")
    single = width >= v
    direct = grad_hidden is not None and all_rows and (single or dtype == acc_dtype(dtype)) and shard is None
    acc_h = None
    if grad_hidden is not None and not direct:
        acc_h = ledger.workspace((min(group, n), d), acc_dtype(dtype), hidden.device, name="grad_rows")
    for r0 in range(0, n, group):
        r1 = min(n, r0 + group)
        h = hidden_rows(hidden, rows, r0, r1, hbuf)
        out_h = grad_hidden[r0:r1] if direct else None if acc_h is None else acc_h[:r1 - r0]
        for v0, v1 in plan.slices(v, width):
            x = launch.logits(h, weight[v0:v1], flat_view(buf, r1 - r0, v1 - v0))
            passes.grad_logits_(x, bias_slice(bias, v0, v1), targets[r0:r1], v0, g[r0:r1], lse[r0:r1])
            if grad_weight is not None:
                launch.grad_weight(x, h, grad_weight[v0:v1], accumulate=r0 > 0)
            if out_h is not None:
                launch.grad_hidden(x, weight[v0:v1], out_h, accumulate=v0 > 0)
            if grad_bias is not None:
                launch.column_sums(x, grad_bias[v0:v1], accumulate=r0 > 0)
        if acc_h is not None:
            if shard is not None:
                shard.all_reduce(out_h)
            launch.scatter_rows(out_h, rows[r0:r1], grad_hidden)
