"""The losses a selective loss can end in: options checked once at the public edge, and the loss called on a
full token layout (the naive reference, through the public loss functions) or over chunks of compacted,
all-selected tokens (the fused path, in closed form: a few kernels and no host synchronisation per chunk)."""

from __future__ import annotations

import inspect
import itertools

import torch
import torch.nn.functional as F

from ..losses import common, dpo_loss, sepo_loss, simpo_loss, weighted_nll

PAIRWISE = ("sepo", "dpo", "simpo")
LOSSES = PAIRWISE + ("weighted_nll",)
# Each loss's options, and whether each must be > 0 (else only finite); defaults are the loss function's own.
OPTIONS = {"sepo": (sepo_loss, {"gamma": True, "margin": False}), "dpo": (dpo_loss, {"beta": True}),
           "simpo": (simpo_loss, {"beta": True, "gamma": False}), "weighted_nll": (weighted_nll, {})}
# Each pair loss's options that scale its rewards and offset its margin (none: 0).
REWARD_OPTIONS = {"sepo": ("gamma", "margin"), "dpo": ("beta", None), "simpo": ("beta", "gamma")}


def check_options(name: str, options: dict) -> dict:
    """The options of loss ``name``, checked, with the loss function's defaults filled in."""
    function, known = OPTIONS[name]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"loss={name!r} takes the options {sorted(known)}, got {unknown}")
    defaults = inspect.signature(function).parameters
    return {key: common.check_real(key, options.get(key, defaults[key].default), positive=positive)
            for key, positive in known.items()}


def apply_loss(name: str, logps: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor,
               ref_logps: torch.Tensor | None, weights: torch.Tensor | None, backend: str, options: dict):
    """(loss, metrics) of loss ``name`` over the tokens in ``mask``, through the public loss functions."""
    if name == "sepo":
        return sepo_loss(logps, mask, cu_seqlens, backend=backend, **options)
    if name == "dpo":
        return dpo_loss(logps, ref_logps, cu_seqlens, mask=mask, backend=backend, **options)
    if name == "simpo":
        return simpo_loss(logps, cu_seqlens, mask=mask, backend=backend, **options)
    return weighted_nll(logps, torch.where(mask, weights, 0.0), cu_seqlens, backend=backend, **options)


class ChunkedLoss:
    """Loss ``name`` over the chunks of whole units (pairs; sequences for weighted_nll) of the fused path, with
    its gradient w.r.t. each chunk's log-probs in closed form: inputs and ``options`` checked by the caller.

    A token reaches a pair loss only through its response's reward ``scale[s] * sum of (logp - ref)`` (scale:
    the loss's coefficient, over the selected tokens for a mean), so its dL/dlogp is ``-/+ scale[s] *
    sigmoid(offset - margin) / pairs``: per chunk a segment sum, a few ops on [pairs] vectors and a broadcast
    back to the tokens (6 to 8 kernels), where autograd through the public loss launched 24 to 40. The loss
    and metrics come from the rewards once per call (``result``). Sums run in float64 on the torch backend
    and in fp32 on triton, as ``segment_sum``'s.

    ``seg_rows``: the rows of each segment; ``chunks``: each chunk's segments in the order its rows are laid
    out (for pairs [a, b): chosen a..b-1, then rejected a..b-1). Every chunk's boundaries reach the device
    in one copy; ``rows[k]`` is chunk k's range in that order. ``values``: dpo's reference log-probs (which
    are subtracted) or weighted_nll's weights (which multiply), [rows] in that order; None for the others.
    """

    def __init__(self, name: str, options: dict, which: str, seg_rows: list[int], chunks: list[list[int]],
                 values, dtype: torch.dtype, device, need_grad: bool):
        """``dtype``: the log-probs' (float32 or float64), that of the loss, metrics and gradient."""
        self.name, self.which, self.need_grad, self.dtype = name, which, need_grad, dtype
        self.sums_dtype = torch.float64 if which == "torch" else torch.float32
        self.pairs = len(seg_rows) // 2 if name in PAIRWISE else 0
        order = [n for segments in chunks for n in (seg_rows[s] for s in segments)]
        bounds = [c for segments in chunks for c in itertools.accumulate((seg_rows[s] for s in segments), initial=0)]
        ends = list(itertools.accumulate(map(len, chunks), initial=0))
        self.segments = list(zip(ends[:-1], ends[1:]))
        starts = list(itertools.accumulate(order, initial=0))
        self.rows = [(starts[a], starts[b]) for a, b in self.segments]
        counts, in_order, self.cu = torch.tensor(seg_rows + order + bounds, dtype=torch.int64, device=device).split(
            [len(seg_rows), len(order), len(bounds)])
        if which == "torch":  # each row's segment, in chunk order
            self.ids = torch.repeat_interleave(in_order, output_size=starts[-1])
        self.sums = torch.zeros(len(order), dtype=self.sums_dtype, device=device)
        self.values = None if values is None else values.to(self.sums_dtype)
        if self.pairs:
            coefficient, offset = REWARD_OPTIONS[name]
            coefficient, self.offset = options[coefficient], options.get(offset, 0.0)
            counts = counts.to(self.sums_dtype)
            # dpo's reward is a sum, the others' a mean over the selected tokens.
            self.scale = torch.full_like(counts, coefficient) if name == "dpo" else coefficient / counts
            # dL/dsum of each segment per unit of sigmoid(offset - margin): -scale / P chosen, +scale / P rejected.
            self.grad_scale = self.scale / self.pairs
            self.grad_scale[:self.pairs].neg_()
            self.rewards = torch.empty_like(self.scale)
            self.coef = torch.empty_like(self.sums, dtype=dtype)  # written in the gradient's dtype
        elif need_grad:  # weighted_nll: dL/dlogp = -weight / sequences, known before any log-prob
            self.grad = (self.values * (-1.0 / len(seg_rows))).to(dtype)

    def grad_(self, k: int, logp: torch.Tensor) -> torch.Tensor | None:
        """Folds chunk k's log-probs ``logp`` into the sums; returns dL/dlogp, or None if no gradient is wanted."""
        (s0, s1), (r0, r1) = self.segments[k], self.rows[k]
        cu, sums = self.cu[s0 + k:s1 + k + 1], self.sums[s0:s1]
        values = logp
        if self.values is not None:
            values = logp - self.values[r0:r1] if self.name == "dpo" else logp * self.values[r0:r1]
        if self.which == "triton":
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
        if self.which == "triton":
            g = torch.empty(r1 - r0, dtype=self.dtype, device=logp.device)
            triton_kernels.broadcast_into(coef, cu, g)
            return g
        return self.coef.index_select(0, self.ids[r0:r1])

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) over every chunk, as the public loss returns them."""
        dtype = self.dtype
        if not self.pairs:  # chunks hold consecutive sequences: chunk order is theirs
            nll = -self.sums
            return nll.mean().to(dtype), {"nll": nll.to(dtype)}
        chosen, rejected = self.rewards[:self.pairs], self.rewards[self.pairs:]
        margin = chosen - rejected
        loss = -F.logsigmoid(margin - self.offset if self.offset else margin).mean()
        return loss.to(dtype), {"chosen_reward": chosen.to(dtype), "rejected_reward": rejected.to(dtype),
                                "margin": margin.to(dtype), "accuracy": (chosen > rejected).to(dtype)}
