"""Chunked PyTorch path: O(chunk x V) memory, the default on CPU.

The forward walks over chunks of rows, forms that chunk's logits in one reused buffer and keeps only each
row's log-sum-exp. The backward walks again over the rows whose upstream gradient is non-zero, recomputes
their logits and adds both gradients straight from the buffer. No per-chunk tensor of size V is allocated:
the row shift and the exponential are applied in place, and the scale and sign of the gradient are moved
onto the small [chunk, D] operands of the two matmuls.

Without softcap, with g the upstream gradient of a row, t its target and p its softmax (temperature T):
    dL/dz = (g/T) * onehot(t) - sign(g) * exp(z/T - lse + log|g/T|)
so the exponential itself, shifted by ``lse - log|g/T|``, is the gradient up to a per-row sign.
"""

from __future__ import annotations

import torch

# Rows per chunk: about CHUNK_ELEMENTS logits (64 MiB in fp32), enough rows for an efficient matmul.
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int) -> int:
    return int(max(8, min(4096, CHUNK_ELEMENTS // max(vocab, 1))))


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
    """The output head of one call (weight, bias, temperature, softcap) and its reusable logits buffer."""

    def __init__(self, weight, bias, temperature, softcap, rows=None):
        self.weight = weight
        self.temperature = float(temperature)
        self.softcap = softcap
        self.acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # Without softcap the temperature is folded into the hidden rows: z/T = (h/T) @ W.T + b/T.
        self.pre_scale = 1.0 / softcap if softcap is not None else 1.0 / self.temperature
        self.bias = None if bias is None else bias.to(self.acc_dtype) * self.pre_scale
        v = weight.shape[0]
        self.rows = rows or chunk_rows(v)
        self.logits = torch.empty(self.rows, v, dtype=self.acc_dtype, device=weight.device)
        # Half inputs multiply in their own dtype (fp32 accumulation inside the GEMM), then widen.
        self.half_logits = (None if weight.dtype == self.acc_dtype
                            else torch.empty(self.rows, v, dtype=weight.dtype, device=weight.device))

    def logits_of(self, h_rows: torch.Tensor) -> torch.Tensor:
        """x = softcap(h W^T + b) / T for a chunk of rows, written into the shared buffer."""
        n = h_rows.shape[0]
        x = self.logits[:n]
        a = h_rows * self.pre_scale
        if self.half_logits is None:
            torch.mm(a, self.weight.T, out=x)
        else:
            x.copy_(torch.mm(a, self.weight.T, out=self.half_logits[:n]))
        if self.bias is not None:
            x.add_(self.bias)
        if self.softcap is not None:
            x.tanh_().mul_(self.softcap / self.temperature)
        return x

    def logprobs(self, h_rows: torch.Tensor, t_rows: torch.Tensor):
        """(logp, lse) of a chunk of rows. Leaves e = exp(x - rowmax) in the buffer and returns it too,
        with the row sums of e, for a caller that forms the gradient from it (p = e / sum)."""
        x = self.logits_of(h_rows)
        x_t = x.gather(1, t_rows.long()[:, None]).squeeze(1)
        lse, s = logsumexp_(x)
        return x_t - lse, lse, x, s

    def add_grads(self, scaled_p, h_rows, t_rows, g, sign, grads, idx):
        """Adds the gradients of one chunk, given ``scaled_p`` = |g/T| * softmax (in place in the buffer),
        the per-row g/T and its sign: dL/dz = (g/T) * onehot(t) - sign * scaled_p.

        ``grads`` is (grad_hidden [N, D] or None, grad_weight [V, D] accumulator or None,
        grad_bias [V] accumulator or None); ``idx`` the rows of this chunk in grad_hidden."""
        grad_hidden, grad_weight, grad_bias = grads
        acc, w = self.acc_dtype, self.weight
        t = t_rows.long()
        if grad_hidden is not None:
            if w.dtype == acc:
                ep = scaled_p @ w
            else:
                ep = (scaled_p.to(w.dtype) @ w).to(acc)
            gh = g[:, None] * w.index_select(0, t).to(acc) - sign[:, None] * ep
            grad_hidden.index_copy_(0, idx, gh.to(grad_hidden.dtype))
        if grad_weight is not None:
            hs = h_rows.to(acc)
            if w.dtype == acc:
                grad_weight.addmm_(scaled_p.T, hs * (-sign)[:, None])
            else:
                grad_weight += (scaled_p.T.to(w.dtype) @ (hs * (-sign)[:, None]).to(w.dtype)).to(acc)
            grad_weight.index_add_(0, t, hs * g[:, None])
        if grad_bias is not None:
            grad_bias -= sign @ scaled_p
            grad_bias.index_add_(0, t, g)


def forward(hidden, weight, targets, bias, ignore_index, temperature, softcap):
    """Returns (logp [N], lse [N]); rows with ignore_index get logp 0 and lse 0 and cost nothing."""
    head = Head(weight, bias, temperature, softcap)
    logp = torch.zeros(hidden.shape[0], dtype=head.acc_dtype, device=hidden.device)
    lse = torch.zeros_like(logp)
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    for idx in rows.split(head.rows):
        logp[idx], lse[idx], _, _ = head.logprobs(hidden.index_select(0, idx), targets.index_select(0, idx))
    return logp, lse


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


def backward(grad_logp, hidden, weight, targets, lse, bias, ignore_index, temperature, softcap,
             need_hidden, need_weight, need_bias):
    """Gradients of sum(grad_logp * logp) w.r.t. hidden, weight and bias (None for those not needed)."""
    head = Head(weight, bias, temperature, softcap)
    grads = gradient_buffers(hidden, weight, bias, need_hidden, need_weight, need_bias, head.acc_dtype)
    g_all = grad_logp.to(head.acc_dtype) / head.temperature
    # Only rows that carry gradient are recomputed: a loss over 30% of the tokens costs ~30% of a full backward.
    rows = torch.nonzero((g_all != 0) & (targets != ignore_index)).squeeze(1)
    for idx in rows.split(head.rows):
        h, t, g = hidden.index_select(0, idx), targets.index_select(0, idx), g_all.index_select(0, idx)
        x = head.logits_of(h)
        if softcap is None:
            # exp(x - lse + log|g/T|) = |g/T| * softmax; the sign goes onto the small operands.
            x.sub_((lse.index_select(0, idx) - g.abs().log())[:, None]).exp_()
            head.add_grads(x, h, t, g, torch.sign(g), grads, idx)
        else:
            # dz = (g/T) * (onehot - p) * (1 - tanh^2), with tanh = x * T / softcap: formed in full here,
            # then passed on as "scaled_p" with sign -1 and no separate one-hot term.
            tanh = x * (head.temperature / softcap)
            x.sub_(lse.index_select(0, idx)[:, None]).exp_().neg_()
            x.scatter_add_(1, t.long()[:, None], torch.ones_like(g)[:, None])
            x.mul_(tanh.square_().neg_().add_(1)).mul_(g[:, None])
            head.add_grads(x, h, t, torch.zeros_like(g), -torch.ones_like(g), grads, idx)
    return cast_gradients(grads, weight, bias)
