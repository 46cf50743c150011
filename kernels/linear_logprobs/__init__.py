"""linear_logprobs: per-token log-probabilities straight from hidden states, never building [N, V] logits."""

from __future__ import annotations

import torch

from .. import checks
from ..backend import resolve_backend
from ..poison import poisoned_unless
from . import chunked
from .naive import linear_logprobs_naive


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, ignore_index: int = -100, temperature: float = 1.0,
                    softcap: float | None = None, backend: str = "auto") -> torch.Tensor:
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

    Returns:
        [N] float32 log-probabilities (float64 for float64 inputs), differentiable w.r.t. hidden,
        weight and bias. Memory is O(chunk x V) on the torch path. On Triton only the N log-sum-exps are
        saved; the backward recomputes logits only for rows with non-zero gradient, a vocabulary slice at a
        time, so its buffers (a slice of dL/dlogits of about 256 MiB, and [N, D]) do not grow with V.
    """
    checks.check_float("hidden", hidden, 2)
    checks.check_float("weight", weight, 2)
    n, d = hidden.shape
    if weight.shape[1] != d:
        raise ValueError(f"weight must have shape [V, D={d}], got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if bias is not None:
        checks.check_float("bias", bias, 1)
        checks.check_length("bias", bias, weight.shape[0], "V")
    checks.check_targets(targets, n, weight.shape[0], ignore_index)
    checks.check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    checks.check_same_dtype(hidden=hidden, weight=weight, bias=bias)
    checks.check_positive("temperature", temperature)
    if softcap is not None:
        checks.check_positive("softcap", softcap)
    which = resolve_backend(backend, hidden.device)
    if which == "naive":
        return linear_logprobs_naive(hidden, weight, targets, bias, ignore_index, temperature, softcap)
    if which == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden: the triton backend takes float32, bfloat16 or float16, got float64")
    return LinearLogprobs.apply(hidden, weight, targets, bias, ignore_index, float(temperature), softcap, which)


class LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, temperature, softcap, which):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        if which == "triton":
            from . import triton_kernels

            keep = targets != ignore_index
            # Poisoned: a row the kernel fails to write stays nan and fails the tests.
            logp = poisoned_unless(keep)
            lse = poisoned_unless(keep)
            rows = torch.nonzero(keep).squeeze(1)
            triton_kernels.forward_into(hidden, weight, targets, rows, bias, temperature, softcap, logp, lse)
        else:
            logp, lse = chunked.forward(hidden, weight, targets, bias, ignore_index, temperature, softcap)
        ctx.save_for_backward(hidden, weight, targets, bias, lse)
        ctx.options = (ignore_index, temperature, softcap, which)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        ignore_index, temperature, softcap, which = ctx.options
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        if which == "triton":
            from . import triton_kernels

            g = grad_logp.float().contiguous()
            rows = torch.nonzero((g != 0) & (targets != ignore_index)).squeeze(1)
            grads = triton_kernels.backward(g, hidden, weight, targets, rows, lse, bias, temperature, softcap,
                                            need_h, need_w, need_b)
        else:
            grads = chunked.backward(grad_logp, hidden, weight, targets, lse, bias, ignore_index, temperature,
                                     softcap, need_h, need_w, need_b)
        grad_hidden, grad_weight, grad_bias = grads
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None


__all__ = ["linear_logprobs", "linear_logprobs_naive", "LinearLogprobs"]
