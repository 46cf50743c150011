"""Chunked PyTorch path: O(chunk) memory, never [N, V] logits; the default on CPU.

Rows go in groups of up to ROW_GROUP and the vocabulary in blocks, so one [rows, block] tile of logits
(about CHUNK_ELEMENTS values, reused) is alive at a time. The forward keeps an online log-sum-exp per row
across the blocks and saves only the N log-sum-exps. The backward takes again only the rows whose
upstream gradient is non-zero and, block by block, recomputes the logits and adds both gradients straight
from the tile: dL/dhidden accumulates in a [rows, D] buffer, and each block of dL/dweight is a [block, D]
slice, so the big gradient is written once per row group rather than once per chunk of rows.

Without softcap, with g the upstream gradient of a row, t its target and p its softmax (temperature T):
    dL/dz = (g/T) * onehot(t) - sign(g) * exp(z/T - lse + log|g/T|)
so the exponential itself, shifted by ``lse - log|g/T|``, is the gradient up to a per-row sign, which is
moved onto the small [rows, D] operands; the one-hot part is added once per row at the end.
"""

from __future__ import annotations

import torch

# Logits held at once (32 MiB in fp32).
CHUNK_ELEMENTS = 1 << 23
# Rows multiplied together by the streaming forward and backward.
ROW_GROUP = 4096


def chunk_rows(vocab: int) -> int:
    """Rows of a full-vocabulary chunk, for paths that need a row's logits all at once."""
    return int(max(8, min(4096, CHUNK_ELEMENTS // max(vocab, 1))))


def block_cols(rows: int, vocab: int) -> int:
    """Width of the vocabulary blocks for a group of ``rows``."""
    return int(min(vocab, max(128, CHUNK_ELEMENTS // max(rows, 1))))


def logsumexp_(x: torch.Tensor):
    """Row log-sum-exps of ``x``, overwriting x with e = exp(x - rowmax); returns (lse, row sums of e).

    A row holding nan or +inf comes out nan (x - max is nan there), never as a number; a row of only -inf
    gets lse = -inf, so its log-probs are -inf - (-inf) = nan, as log_softmax gives.
    """
    m = x.amax(dim=1)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    s = x.sub_(m[:, None]).exp_().sum(dim=1)
    return m + s.log(), s


class Head:
    """The output head of one call: weight, optional bias, temperature and softcap."""

    def __init__(self, weight, bias, temperature, softcap):
        self.weight = weight
        self.temperature = float(temperature)
        self.softcap = softcap
        self.acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # Without softcap the temperature is folded into the hidden rows: z/T = (h/T) @ W.T + b/T.
        self.pre_scale = 1.0 / softcap if softcap is not None else 1.0 / self.temperature
        self.bias = None if bias is None else bias.to(self.acc_dtype) * self.pre_scale

    def buffer(self, rows: int, cols: int) -> torch.Tensor:
        return torch.empty(rows, cols, dtype=self.acc_dtype, device=self.weight.device)

    def logits_of(self, h_rows: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
        """x = softcap(h W^T + b) / T for vocabulary columns [start, start + out.shape[1]), written into out."""
        w = self.weight[start:start + out.shape[1]]
        a = h_rows * self.pre_scale
        if w.dtype == out.dtype:
            torch.mm(a, w.T, out=out)
        else:  # half inputs multiply in their own dtype (fp32 accumulation inside the GEMM), then widen
            out.copy_(a @ w.T)
        if self.bias is not None:
            out.add_(self.bias[start:start + out.shape[1]])
        if self.softcap is not None:
            out.tanh_().mul_(self.softcap / self.temperature)
        return out

    def logprobs(self, h_rows: torch.Tensor, t_rows: torch.Tensor, buf: torch.Tensor):
        """(logp, lse) of a group of rows, streaming over vocabulary blocks of buf's width with an online
        log-sum-exp. When buf spans the whole vocabulary it is left holding e = exp(x - rowmax), returned
        with its row sums, for a caller that forms the gradient next (softmax = e / sums)."""
        n, v = h_rows.shape[0], self.weight.shape[0]
        width = buf.shape[1]
        t = t_rows.long()
        x_t = torch.zeros(n, dtype=self.acc_dtype, device=h_rows.device)
        lse = None
        for start in range(0, v, width):
            x = self.logits_of(h_rows, start, buf[:n, :min(width, v - start)])
            inside = (t >= start) & (t < start + x.shape[1])
            x_t += torch.where(inside, x.gather(1, (t - start).clamp(0, x.shape[1] - 1)[:, None]).squeeze(1), 0.0)
            block_lse, s = logsumexp_(x)
            lse = block_lse if lse is None else torch.logaddexp(lse, block_lse)
        return x_t - lse, lse, x, s

    def add_block_grads(self, scaled_p, start, neg_sign, h_signed, grads_acc):
        """Adds the softmax part of one vocabulary block's gradient, given ``scaled_p`` = |g/T| * softmax
        (or the whole dL/dz, with sign -1), ``neg_sign`` = -sign(g) and ``h_signed`` = -sign(g) * h:
        into the [rows, D] accumulator of dL/dhidden (its sign applied in ``finish_grads``), and the
        block's slices of dL/dweight and dL/dbias."""
        acc_h, grad_weight, grad_bias = grads_acc
        end = start + scaled_p.shape[1]
        w = self.weight[start:end]
        if acc_h is not None:
            if w.dtype == acc_h.dtype:
                acc_h.addmm_(scaled_p, w)
            else:
                acc_h += (scaled_p.to(w.dtype) @ w).to(acc_h.dtype)
        if grad_weight is not None:
            if w.dtype == grad_weight.dtype:
                grad_weight[start:end].addmm_(scaled_p.T, h_signed)
            else:
                grad_weight[start:end] += (scaled_p.T.to(w.dtype) @ h_signed.to(w.dtype)).to(grad_weight.dtype)
        if grad_bias is not None:
            grad_bias[start:end] += neg_sign @ scaled_p

    def finish_grads(self, acc_h, h_rows, t_rows, g, sign, grads, idx):
        """Adds the one-hot part (g/T at each target) and writes dL/dhidden = g/T * W[t] - sign * acc_h."""
        grad_hidden, grad_weight, grad_bias = grads
        t = t_rows.long()
        if grad_hidden is not None:
            gh = g[:, None] * self.weight.index_select(0, t).to(self.acc_dtype) - sign[:, None] * acc_h
            grad_hidden.index_copy_(0, idx, gh.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.index_add_(0, t, h_rows.to(self.acc_dtype) * g[:, None])
        if grad_bias is not None:
            grad_bias.index_add_(0, t, g)


def gradient_buffers(hidden, weight, bias, need_hidden, need_weight, need_bias, acc_dtype):
    """Zeroed (grad_hidden, grad_weight, grad_bias); the two [V]-shaped ones accumulate in ``acc_dtype``."""
    return (torch.zeros_like(hidden) if need_hidden else None,
            torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None,
            torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_bias else None)


def cast_gradients(grads, weight, bias):
    grad_hidden, grad_weight, grad_bias = grads
    return (grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


def forward(hidden, weight, targets, bias, ignore_index, temperature, softcap):
    """Returns (logp [N], lse [N]); rows with ignore_index get logp 0 and lse 0 and cost nothing."""
    head = Head(weight, bias, temperature, softcap)
    logp = torch.zeros(hidden.shape[0], dtype=head.acc_dtype, device=hidden.device)
    lse = torch.zeros_like(logp)
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    group = min(ROW_GROUP, max(rows.numel(), 1))
    buf = head.buffer(group, block_cols(group, weight.shape[0]))
    for idx in rows.split(group):
        logp[idx], lse[idx], _, _ = head.logprobs(hidden.index_select(0, idx), targets.index_select(0, idx), buf)
    return logp, lse


def backward(grad_logp, hidden, weight, targets, lse, bias, ignore_index, temperature, softcap,
             need_hidden, need_weight, need_bias):
    """Gradients of sum(grad_logp * logp) w.r.t. hidden, weight and bias (None for those not needed)."""
    head = Head(weight, bias, temperature, softcap)
    acc = head.acc_dtype
    grads = gradient_buffers(hidden, weight, bias, need_hidden, need_weight, need_bias, acc)
    g_all = grad_logp.to(acc) / head.temperature
    # Only rows that carry gradient are recomputed: a loss over 30% of the tokens costs ~30% of a full backward.
    rows = torch.nonzero((g_all != 0) & (targets != ignore_index)).squeeze(1)
    v = weight.shape[0]
    group = min(ROW_GROUP, max(rows.numel(), 1))
    buf = head.buffer(group, block_cols(group, v))
    acc_h_buf = torch.empty(group, hidden.shape[1], dtype=acc, device=hidden.device) if need_hidden else None
    for idx in rows.split(group):
        n = idx.numel()
        h, t, g = hidden.index_select(0, idx), targets.index_select(0, idx).long(), g_all.index_select(0, idx)
        acc_h = acc_h_buf[:n].zero_() if need_hidden else None
        sign = torch.sign(g) if softcap is None else -torch.ones_like(g)
        neg_sign = -sign
        h_signed = h.to(acc) * neg_sign[:, None] if need_weight else None
        shift = (lse.index_select(0, idx) - g.abs().log()) if softcap is None else lse.index_select(0, idx)
        for start in range(0, v, buf.shape[1]):
            x = head.logits_of(h, start, buf[:n, :min(buf.shape[1], v - start)])
            if softcap is None:
                # exp(x - lse + log|g/T|) = |g/T| * softmax; the sign goes onto the small operands.
                x.sub_(shift[:, None]).exp_()
            else:
                # dz = (g/T) * (onehot - p) * (1 - tanh^2), tanh = x * T / softcap: formed in full here and
                # passed on with sign -1; the one-hot part is added in this block, not in finish_grads.
                tanh = x * (head.temperature / softcap)
                x.sub_(shift[:, None]).exp_().neg_()
                inside = torch.nonzero((t >= start) & (t < start + x.shape[1])).squeeze(1)
                x[inside, t[inside] - start] += 1
                x.mul_(tanh.square_().neg_().add_(1)).mul_(g[:, None])
            head.add_block_grads(x, start, neg_sign, h_signed, (acc_h, grads[1], grads[2]))
        head.finish_grads(acc_h, h, t, g if softcap is None else torch.zeros_like(g), sign, grads, idx)
    return cast_gradients(grads, weight, bias)
