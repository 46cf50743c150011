"""The PyTorch path, the default on CPU: chunks of rows, O(chunk x V) extra memory.

The forward walks over chunks of the kept rows, copies each chunk into one reused fp32 buffer (never an fp32
copy of the whole half-precision tensor) and keeps only the row's log-sum-exp. The backward walks over the
rows whose upstream gradient is non-zero, turns the buffer into the gradient in place and writes it into
``out``, which may be the logits themselves; every other row of ``out`` is filled with 0 without being read.

With g the upstream gradient of a row, t its target and T the temperature:
    dL/dx = (g/T) * (onehot(t) - exp(x/T - lse))
"""

from __future__ import annotations

import torch

from ..utils import acc_dtype, shift_of

# Logits held at once in the math buffer (32 MiB in fp32).
CHUNK_ELEMENTS = 1 << 23


def chunk_rows(vocab: int) -> int:
    """Rows of a chunk of whole-vocabulary rows."""
    return int(max(8, min(4096, CHUNK_ELEMENTS // max(vocab, 1))))


def logsumexp_(x: torch.Tensor):
    """Row log-sum-exps of ``x``, overwriting x with e = exp(x - rowmax); returns (lse, row sums of e).

    A row holding nan or +inf comes out nan (x - max is nan there), never as a number; a row of only -inf
    gets lse = -inf, so its log-probs are -inf - (-inf) = nan, as log_softmax gives.
    """
    m = x.amax(dim=1)
    m = shift_of(m)
    s = x.sub_(m[:, None]).exp_().sum(dim=1)
    return m + s.log(), s


class _Chunks:
    """Reused buffers holding ``logits[rows] / temperature`` in the math dtype, one chunk of rows at a time."""

    def __init__(self, logits, temperature, rows):
        self.logits = logits
        self.temperature = float(temperature)
        self.acc = acc_dtype(logits.dtype)
        v = logits.shape[1]
        self.step = chunk_rows(v)
        size = (min(self.step, rows), v)
        self.x = torch.empty(size, dtype=self.acc, device=logits.device)
        # Half logits are gathered in their own dtype, then widened into the math buffer.
        self.half = None if logits.dtype == self.acc else torch.empty(size, dtype=logits.dtype, device=logits.device)

    def load(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.x[:idx.numel()]
        if self.half is None:
            torch.index_select(self.logits, 0, idx, out=x)
        else:
            x.copy_(torch.index_select(self.logits, 0, idx, out=self.half[:idx.numel()]))
        if self.temperature != 1.0:
            x.div_(self.temperature)
        return x

    def store(self, out: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> None:
        if self.half is not None:
            x = self.half[:idx.numel()].copy_(x)
        out.index_copy_(0, idx, x)


def forward(logits, targets, ignore_index, temperature):
    """Returns (logp [N], lse [N]) in the math dtype; rows with ignore_index get 0 and 0 and cost nothing."""
    n = logits.shape[0]
    acc = acc_dtype(logits.dtype)
    logp = torch.zeros(n, dtype=acc, device=logits.device)
    lse = torch.zeros(n, dtype=acc, device=logits.device)
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    chunks = _Chunks(logits, temperature, rows.numel())
    for idx in rows.split(chunks.step):
        x = chunks.load(idx)
        x_t = x.gather(1, targets.index_select(0, idx).long()[:, None]).squeeze(1)
        row_lse, _ = logsumexp_(x)
        lse[idx] = row_lse
        logp[idx] = x_t - row_lse
    return logp, lse


def backward(grad_logp, logits, targets, lse, ignore_index, temperature, out):
    """Writes the gradient w.r.t. logits into ``out`` (the logits themselves allowed) and returns it."""
    g_all = grad_logp.to(acc_dtype(logits.dtype))
    active = (g_all != 0) & (targets != ignore_index)
    out.index_fill_(0, torch.nonzero(~active).squeeze(1), 0)
    rows = torch.nonzero(active).squeeze(1)
    chunks = _Chunks(logits, temperature, rows.numel())
    for idx in rows.split(chunks.step):
        g = g_all.index_select(0, idx)[:, None] / chunks.temperature
        x = chunks.load(idx)
        x.sub_(lse.index_select(0, idx)[:, None]).exp_().mul_(-g)
        x.scatter_add_(1, targets.index_select(0, idx).long()[:, None], g)
        # Each chunk reads and writes only its own rows, so out may alias logits.
        chunks.store(out, idx, x)
    return out
