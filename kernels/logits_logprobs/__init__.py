"""logits_logprobs: per-token log-probabilities from logits the caller already holds, in one pass per row.

The twin of ``linear_logprobs`` for models whose head cannot be fused (or whose logits are needed anyway).
"""

from __future__ import annotations

import torch

from .. import checks
from ..utils import poisoned
from . import torch_ops
from .naive import logprobs_from_logits_naive


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                         temperature: float = 1.0, inplace_backward: bool = False,
                         backend: str = "auto") -> torch.Tensor:
    """Log-probability of each target token: ``log_softmax(logits / temperature)[i, targets[i]]``.

    Args:
        logits: [N, V] (fp32, bf16, fp16; fp64 on the torch and naive backends). Math is fp32 (fp64 for fp64).
        targets: [N] int64/int32 token ids in [0, V), or ``ignore_index``.
        ignore_index: targets equal to it give exactly 0 and zero gradient, and cost nothing.
        temperature: logits are divided by it (> 0).
        inplace_backward: WARNING: when True, the backward DESTROYS ``logits``: it writes the gradient over
            the logits buffer instead of allocating a second [N, V] tensor, and returns that buffer as the
            gradient. The caller must not read ``logits`` after the backward (it then holds the gradient),
            nor use it in any other autograd op that saves it; the backward can run only once (a second one,
            with retain_graph=True, raises). Only a contiguous ``logits`` is reused; otherwise a contiguous
            copy is saved and overwritten instead. The naive backend ignores the flag.
        backend: "auto", "triton", "torch" or "naive" (see ``selpo.kernels.backend``).

    Returns:
        [N] float32 log-probabilities (float64 for float64 logits), differentiable w.r.t. ``logits``; the
        gradient has the logits' dtype. Like ``log_softmax``: a row holding nan or +inf, or only -inf, gives
        nan (and a nan gradient); a -inf logit elsewhere is a masked token (log-prob -inf at it).
        Only the N log-sum-exps are saved for the backward, which skips rows with zero upstream gradient.
    """
    checks.check_float("logits", logits, 2)
    n, v = logits.shape
    if v == 0:
        raise ValueError("logits must have at least one column (V >= 1)")
    checks.check_targets(targets, n, v, ignore_index)
    checks.check_same_device(logits=logits, targets=targets)
    checks.check_positive("temperature", temperature)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    backend = checks.resolve("logits", logits, backend)
    if backend == "naive":
        return logprobs_from_logits_naive(logits, targets, ignore_index, temperature)
    return LogitsLogprobs.apply(logits, targets, ignore_index, float(temperature), inplace_backward, backend)


class LogitsLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, temperature, inplace_backward, backend):
        logits, targets = logits.contiguous(), targets.contiguous()
        if backend == "triton":
            from . import triton_kernels

            # The kernel writes every row (0 for ignored ones).
            logp = poisoned((logits.shape[0],), torch.float32, logits.device)
            lse = poisoned((logits.shape[0],), torch.float32, logits.device)
            triton_kernels.forward_into(logits, targets, ignore_index, temperature, logp, lse)
        else:
            logp, lse = torch_ops.forward(logits, targets, ignore_index, temperature)
        ctx.save_for_backward(logits, targets, lse)
        ctx.options = (ignore_index, temperature, inplace_backward, backend)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        logits, targets, lse = ctx.saved_tensors
        ignore_index, temperature, inplace_backward, backend = ctx.options
        out = logits if inplace_backward else torch.empty_like(logits)
        if backend == "triton":
            from . import triton_kernels

            triton_kernels.backward_into(grad_logp.float().contiguous(), logits, targets, lse, ignore_index,
                                         temperature, out)
            if inplace_backward:
                # The kernel wrote through a raw pointer: tell autograd, so that any later use of the saved
                # logits (a second backward, another op that saved them) fails loudly instead of reading a gradient.
                torch.autograd.graph.increment_version(out)
        else:
            torch_ops.backward(grad_logp, logits, targets, lse, ignore_index, temperature, out)
        return out, None, None, None, None, None


__all__ = ["logprobs_from_logits", "logprobs_from_logits_naive", "LogitsLogprobs"]
