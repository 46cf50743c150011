"""linear_logprobs: per-token log-probabilities straight from hidden states, never building [N, V] logits."""

from __future__ import annotations

import torch

from .. import checks, ledger
from ..streaming.logprobs import row_grads, row_logprobs
from ..streaming.passes import Passes
from ..utils import acc_dtype, unit_stride
from .naive import linear_logprobs_naive


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                    softcap: float | None = None, backend: str = "auto", process_group=None) -> torch.Tensor:
    """Log-probability of each target token under a linear output head.

    Computes ``log_softmax(softcap(hidden @ weight.T + bias) / temperature)[i, targets[i]]`` where
    ``softcap(z) = softcap * tanh(z / softcap)`` (skipped when ``softcap`` is None).

    Args:
        hidden: [N, D] last hidden states (fp32, bf16, fp16; fp64 on the torch and naive backends).
        weight: [V, D] output embedding (lm_head), same dtype and device as ``hidden``.
        targets: [N] int64/int32 token ids in [0, V), or ``ignore_index``.
        bias: optional [V] output bias.
        ignore_index: targets equal to it give exactly 0 and no gradient, and cost nothing.
        temperature: logits are divided by it (> 0).
        softcap: optional tanh soft-capping of the logits (> 0), as in Gemma 2.
        backend: "auto", "triton", "torch" or "naive" (see ``selpo.kernels.backend``).
        process_group: the head is sharded over this group along the vocabulary: ``weight`` (and ``bias``)
            hold this process's rows, laid out by rank, and every process passes the same hidden rows and
            targets (ids in the whole vocabulary). A DTensor weight sharded on dim 0 gives its own group.
            Each process gets every row's log-prob and its own shard's weight gradient; per call the forward
            all-reduces two fp32 vectors of the rows computed ([n] and [2, n]) and the backward one fp32
            [n, D] hidden gradient (``selpo.kernels.streaming.shard``). Not with the naive backend.

    Returns:
        [N] float32 log-probabilities (float64 for float64 inputs), differentiable w.r.t. hidden,
        weight and bias. The logits are GEMM tiles in one reused buffer (``selpo.kernels.streaming``), so the
        workspace does not grow with V; only the N log-sum-exps are saved, and the backward recomputes logits
        only for rows with a non-zero gradient: four GEMMs over the rows in all.
    """
    weight, shard = checks.check_head(hidden, weight, targets, bias, ignore_index, temperature, softcap,
                                      process_group)
    backend = checks.resolve("hidden", hidden, backend, shard)
    if backend == "naive":
        return linear_logprobs_naive(hidden, weight, targets, bias, ignore_index, temperature, softcap)
    return LinearLogprobs.apply(hidden, weight, targets, bias, ignore_index, float(temperature), softcap, backend,
                                shard)


class LinearLogprobs(torch.autograd.Function):
    """Saves the inputs and the N log-sum-exps; the backward recomputes logits only for rows with gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, temperature, softcap, backend, shard):
        hidden, weight, bias = unit_stride(hidden), unit_stride(weight), unit_stride(bias)
        targets = targets.contiguous()
        acc = acc_dtype(hidden.dtype)
        rows = torch.nonzero(targets != ignore_index).squeeze(1)  # the call's one host synchronisation
        logp = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.zeros_like(logp)
        passes = Passes(backend, temperature, softcap)
        logp[rows], lse[rows] = row_logprobs(passes, hidden, weight, bias, rows, targets.index_select(0, rows), shard)
        ctx.save_for_backward(hidden, weight, targets, bias, lse)
        ctx.options = (ignore_index, passes, shard)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        ignore_index, passes, shard = ctx.options
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        g = grad_logp.to(lse.dtype)
        # Only rows that carry gradient are recomputed: a loss over 30% of the tokens costs ~30% of a full backward.
        rows = torch.nonzero((g != 0) & (targets != ignore_index)).squeeze(1)
        grads = gradient_buffers(hidden, weight, bias, rows.numel() > 0, need_h, need_w, need_b)
        row_grads(passes, g.index_select(0, rows), hidden, weight, bias, rows, targets.index_select(0, rows),
                  lse.index_select(0, rows), grads, shard)
        grad_hidden, grad_weight, grad_bias = grads
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None, None


def gradient_buffers(hidden, weight, bias, any_row, need_hidden, need_weight, need_bias):
    """(grad_hidden zeroed, grad_weight, grad_bias) in the inputs' dtypes, None where not needed. The [V]-shaped
    ones are written whole by the backward when it has a row, so they are zeroed only when it has none."""
    def alloc(t, needed, fill):
        return ledger.workspace(t.shape, t.dtype, t.device, fill=fill, output=True) if needed else None

    return (alloc(hidden, need_hidden, 0.0), alloc(weight, need_weight, None if any_row else 0.0),
            alloc(bias, need_bias, None if any_row else 0.0))


__all__ = ["linear_logprobs", "linear_logprobs_naive", "LinearLogprobs"]
