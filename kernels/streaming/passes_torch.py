"""The memory-bound passes in PyTorch ops: the CPU's implementation of what ``passes_triton`` does on a GPU.

A logits tile ``x`` [r, w] holds raw products h . w of vocabulary columns [v0, v0 + w); ``z = transform(x)``
is what the softmax sees: ``softcap(x + b) / T``. Math in fp32 (fp64 for fp64 inputs).

A pass is several PyTorch ops (max, subtract, exp, sum, ...), each a sweep over its operand. Run over a whole
tile, each sweep streams it from memory again; so each pass walks the tile in blocks of rows small enough to
stay in a core's cache (``BLOCK_BYTES``) and runs all its ops on a block before the next: the tile crosses
memory about once per pass, as one Triton program's registers make it on a GPU.
"""

from __future__ import annotations

import torch

from ..utils import acc_dtype, shift_of

# Bytes of a block of rows (in the math dtype) that a pass finishes before moving on: within the 1-2 MiB L2
# cache of one core of a current server CPU, split between the threads of an op.
BLOCK_BYTES = 1 << 20


def row_blocks(x: torch.Tensor) -> list[tuple[int, int]]:
    """[a, b) ranges of rows of ``x`` of about BLOCK_BYTES each in the math dtype (at least one row)."""
    rows, cols = x.shape
    step = max(1, BLOCK_BYTES // max(1, cols * acc_dtype(x.dtype).itemsize))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def transform_(z: torch.Tensor, bias: torch.Tensor | None, temperature: float, softcap: float | None) -> torch.Tensor:
    """z <- softcap(z + bias) / T in place (z already in the math dtype)."""
    if bias is not None:
        z += bias.to(z.dtype)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def transformed(x: torch.Tensor, bias, temperature, softcap) -> torch.Tensor:
    """transform(x) without touching x."""
    return transform_(x.to(acc_dtype(x.dtype), copy=True), bias, temperature, softcap)


def target_logits(h, rows, w, bias, targets, temperature, softcap) -> torch.Tensor:
    """z of each row ``rows[i]`` of h at its target ``targets[i]``, from the fp32 dot product of the row with
    its target's weight row (exact, never read from a half-precision logits tile)."""
    acc = acc_dtype(h.dtype)
    t = targets.long()
    z = (h.index_select(0, rows).to(acc) * w.index_select(0, t).to(acc)).sum(1)
    return transform_(z[:, None], None if bias is None else bias.index_select(0, t)[:, None], temperature,
                      softcap)[:, 0]


def vocab_split(rows: int, cols: int, device) -> tuple[int, int]:
    """(launches per row, columns each) of ``merge_lse_``: PyTorch ops take the tile whole (see
    ``passes_triton.vocab_split``)."""
    return 1, cols


def merge_lse_(x, bias, m, s, temperature, softcap, keep: bool = True) -> None:
    """Folds the tile into each row's running max ``m`` and sum ``s`` of exp(z - m) (in place); x is kept,
    unless ``keep`` is False (then its contents are undefined after). A block costs two ops (the transform and
    ``torch.logsumexp``, whose max, exp and sum sweep the cached block); the rows' [r] vectors merge after.

    A row holding nan or +inf ends with a nan sum, never a number."""
    in_place = not keep and x.dtype == acc_dtype(x.dtype)
    lse = torch.empty_like(m)
    for a, b in row_blocks(x):
        z = (transform_ if in_place else transformed)(x[a:b], bias, temperature, softcap)
        torch.logsumexp(z, dim=1, out=lse[a:b])
    m_new = torch.maximum(m, lse)
    safe = shift_of(m_new)
    s.mul_(torch.exp(m - safe)).add_(torch.exp(lse - safe))
    m.copy_(m_new)


def grad_logits_(x, bias, targets, v0, g, lse, temperature, softcap) -> None:
    """x <- dL/dx = g/T * (onehot(target) - softmax(z)) * softcap'(x + b), in place, for upstream gradients
    ``g`` [r] (fp32) of the rows' log-probs; ``targets`` [r] are the rows' targets (others than [v0, v0+w)
    simply match no column). The rows' [r] vectors are made before the blocks, which cost their sweeps only."""
    cols = targets.long() - v0
    inside = (cols >= 0) & (cols < x.shape[1])
    cols = cols.clamp(0, x.shape[1] - 1)[:, None]
    acc = acc_dtype(x.dtype)
    g_t = g.to(acc) / temperature
    in_place = x.dtype == acc
    lse = lse.to(acc)[:, None]
    if softcap is None:  # g/T * onehot - (g/T) * p
        scale, onehot = -g_t[:, None], (g_t * inside)[:, None]
    else:  # (onehot - p) * (1 - tanh^2), then times g/T
        scale, onehot = g_t[:, None], inside.to(acc)[:, None]
    for a, b in row_blocks(x):
        z = (transform_ if in_place else transformed)(x[a:b], bias, temperature, softcap)
        if softcap is None:
            z.sub_(lse[a:b]).exp_().mul_(scale[a:b])
            z.scatter_add_(1, cols[a:b], onehot[a:b])
        else:
            tanh_sq = (z * (temperature / softcap)).square_()
            z.sub_(lse[a:b]).exp_().neg_()
            z.scatter_add_(1, cols[a:b], onehot[a:b])
            z.mul_(tanh_sq.neg_().add_(1)).mul_(scale[a:b])
        if not in_place:
            x[a:b] = z


def logprobs_and_grad_(x, bias, targets, x_t, loss_grad, temperature):
    """The fused loss's tile, spanning the whole vocabulary, in the math dtype and without softcap: (lse, g)
    with g = loss_grad(x_t - lse) (None: no gradient wanted), and x <- dL/dx when g is given. exp(z - max)
    stays in x between the two halves, and the softmax is that over its row sum: the tile crosses memory
    twice, once per half."""
    m = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    s = torch.empty_like(m)
    for a, b in row_blocks(x):
        z = transform_(x[a:b], bias, temperature, None)
        torch.amax(z, dim=1, out=m[a:b])
        torch.sum(z.sub_(shift_of(m[a:b])[:, None]).exp_(), dim=1, out=s[a:b])
    lse = shift_of(m) + s.log()
    g = loss_grad(x_t - lse)
    if g is not None:
        g_t = g.to(x.dtype) / temperature
        x.mul_((-g_t / s)[:, None]).scatter_add_(1, targets.long()[:, None], g_t[:, None])
    return lse, g
