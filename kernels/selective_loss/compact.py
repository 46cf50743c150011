"""A registered loss over the compacted layout of the fused path: only the selected tokens, in chunks of whole
units (pairs, or sequences), with its gradient w.r.t. each chunk's log-probs in closed form."""

from __future__ import annotations

import itertools

import torch

from ..losses import common
from ..losses.spec import FusedLoss


class CompactLoss:
    """``loss`` over the chunks of the fused path; inputs, ``options`` and ``backend`` checked by the caller.

    A token reaches the loss only through its response's reward ``scale[s] * sum of (slope * logp + shift)``
    (``FusedLoss.compact``), so its dL/dlogp is ``slope * scale[s] * dL/dreward[s]``: for a pair loss,
    ``-/+ sigmoid(offset - margin) / pairs``, per chunk a segment sum, a few ops on [pairs] vectors and a
    broadcast back to the tokens (6 to 8 kernels, where autograd through the public loss launched 24 to 40);
    for a per-sequence loss, ``1 / sequences``, known before any log-prob. The loss and metrics come from the
    rewards once per call (``result``). Sums run in float64 on the torch backend and in fp32 on triton, as
    ``segment_sum``'s.

    ``seg_rows``: the rows of each segment; ``chunks``: each chunk's segments in the order its rows are laid out
    (for pairs [a, b): chosen a..b-1, then rejected a..b-1); ``order``: the rows of hidden in that order. Every
    chunk's boundaries reach the device in one copy; ``rows[k]`` is chunk k's range in that order. ``inputs``:
    the loss's per-token inputs [N], gathered into that order once.
    """

    def __init__(self, loss: FusedLoss, options: dict, inputs: dict, backend: str, dtype: torch.dtype,
                 need_grad: bool, seg_rows: list[int], chunks: list[list[int]], order: torch.Tensor):
        """``dtype``: the log-probs' (float32 or float64), that of the loss, metrics and gradient."""
        self.backend, self.need_grad, self.dtype, self.metric = backend, need_grad, dtype, loss.metric
        self.sums_dtype = torch.float64 if backend == "torch" else torch.float32
        self.pairs = len(seg_rows) // 2 if loss.pairwise else 0
        device = order.device
        in_order = [n for segments in chunks for n in (seg_rows[s] for s in segments)]
        bounds = [c for segments in chunks for c in itertools.accumulate((seg_rows[s] for s in segments), initial=0)]
        ends = list(itertools.accumulate(map(len, chunks), initial=0))
        self.segments = list(zip(ends[:-1], ends[1:]))
        starts = list(itertools.accumulate(in_order, initial=0))
        self.rows = [(starts[a], starts[b]) for a, b in self.segments]
        counts, rows_in_order, self.cu = torch.tensor(seg_rows + in_order + bounds, dtype=torch.int64,
                                                      device=device).split([len(seg_rows), len(in_order), len(bounds)])
        if backend == "torch" or not self.pairs:  # each row's segment, in chunk order
            self.ids = torch.repeat_interleave(rows_in_order, output_size=starts[-1])
        self.sums = torch.zeros(len(in_order), dtype=self.sums_dtype, device=device)
        linear = loss.compact(counts.to(self.sums_dtype), **{name: t.index_select(0, order).to(self.sums_dtype)
                                                             for name, t in inputs.items()}, **options)
        self.slope, self.shift, self.offset = linear.slope, linear.shift, linear.offset
        if isinstance(linear.scale, torch.Tensor):
            self.scale = linear.scale.to(self.sums_dtype).expand(len(seg_rows)).contiguous()
        else:
            self.scale = torch.full((len(seg_rows),), float(linear.scale), dtype=self.sums_dtype, device=device)
        if self.pairs:
            # dL/dsum of each segment per unit of sigmoid(offset - margin): -scale / P chosen, +scale / P rejected.
            self.grad_scale = self.scale / self.pairs
            self.grad_scale[:self.pairs].neg_()
            self.rewards = torch.empty_like(self.scale)
            self.coef = torch.empty_like(self.sums, dtype=dtype)  # written in the gradient's dtype
        elif need_grad:  # dL/dlogp = slope * scale / sequences, known before any log-prob
            grad = (self.scale / len(seg_rows)).index_select(0, self.ids)
            self.grad = (grad if self.slope is None else grad * self.slope).to(dtype)

    def grad_(self, k: int, logp: torch.Tensor) -> torch.Tensor | None:
        """Folds chunk k's log-probs ``logp`` into the sums; returns dL/dlogp, or None if no gradient is wanted."""
        (s0, s1), (r0, r1) = self.segments[k], self.rows[k]
        cu, sums = self.cu[s0 + k:s1 + k + 1], self.sums[s0:s1]
        values = logp if self.slope is None else logp * self.slope[r0:r1]
        if self.shift is not None:
            values = values + self.shift[r0:r1]
        if self.backend == "triton":
            from ..segment_sum import triton_kernels

            triton_kernels.sum_into(values, cu, sums)
        else:
            self.sums.index_add_(0, self.ids[r0:r1], values.to(self.sums_dtype))
        if not self.pairs:
            return self.grad[r0:r1] if self.need_grad else None
        a, b = s0 // 2, s1 // 2  # the chunk's pairs
        per_pair = (2, self.pairs)
        rewards = torch.mul(sums.view(2, b - a), self.scale.view(per_pair)[:, a:b],
                            out=self.rewards.view(per_pair)[:, a:b])
        if not self.need_grad:
            return None
        behind = rewards[1] - rewards[0]  # offset - margin, less the offset
        if self.offset:
            behind += self.offset
        coef = self.coef[s0:s1]
        torch.mul(behind.sigmoid_(), self.grad_scale.view(per_pair)[:, a:b], out=coef.view(2, b - a))
        if self.backend == "triton":
            g = torch.empty(r1 - r0, dtype=self.dtype, device=logp.device)
            triton_kernels.broadcast_into(coef, cu, g)
        else:
            g = self.coef.index_select(0, self.ids[r0:r1])
        return g if self.slope is None else g.mul_(self.slope[r0:r1])

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) over every chunk, as the loss's full function returns them."""
        if self.pairs:
            loss, metrics = common.pair_loss(self.rewards, self.offset)
        else:  # chunks hold consecutive sequences: chunk order is theirs
            rewards = self.scale * self.sums
            loss, metrics = rewards.mean(), {self.metric: rewards}
        return loss.to(self.dtype), {name: value.to(self.dtype) for name, value in metrics.items()}
