"""The float64 reference every implementation is checked against before it is timed: selpo's naive
reference op (full logits, log_softmax, gather) in float64, differentiated by autograd, on the same inputs
(half inputs are widened exactly), run over chunks of rows so that it fits in memory at any size. Rows are
independent, so chunking changes nothing but the order of the weight-gradient sum."""

from __future__ import annotations

import torch

from selpo.kernels.linear_logprobs.naive import linear_logprobs_naive

# Rows per chunk: about 32M float64 logits (256 MiB) per [rows, V] buffer; autograd keeps a few of them.
CHUNK_ELEMENTS = 1 << 25


def naive64(hidden, weight, targets, grad=None, *, all_rows=True):
    """(logp [N], grad_hidden [N, D], grad_weight [V, D]) in float64: log-probs and the gradients of
    ``sum(grad * logp)`` (both None without ``grad``). Rows where ``grad`` is 0 only run the forward, and
    with ``all_rows=False`` not even that (their logp stays 0)."""
    h64, w64 = hidden.to(torch.float64), weight.to(torch.float64).requires_grad_()
    n = hidden.shape[0]
    logp = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    grad_hidden = None if grad is None else torch.zeros_like(h64)
    grad_weight = None if grad is None else torch.zeros_like(w64, requires_grad=False)
    active = torch.zeros(n, dtype=torch.bool, device=hidden.device) if grad is None else grad != 0
    rows = torch.arange(n, device=hidden.device) if all_rows else torch.nonzero(active).squeeze(1)
    for idx in rows.split(max(1, CHUNK_ELEMENTS // weight.shape[0])):
        h, t = h64.index_select(0, idx), targets.index_select(0, idx)
        if bool(active[idx].any()):
            h.requires_grad_()
            with torch.enable_grad():
                lp = linear_logprobs_naive(h, w64, t)
            gh, gw = torch.autograd.grad(lp, (h, w64), grad.index_select(0, idx).to(torch.float64))
            grad_hidden[idx] = gh
            grad_weight += gw
        else:
            with torch.no_grad():
                lp = linear_logprobs_naive(h, w64, t)
        logp[idx] = lp.detach()
    return logp, grad_hidden, grad_weight


class Float64:
    """The float64 results of one Inputs, computed on first request and kept for the other cases and
    implementations of the same shape."""

    def __init__(self, inputs):
        self.inputs = inputs
        self._memo = {}

    def memo(self, key, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def logp(self, model: str = "a") -> torch.Tensor:
        x = self.inputs
        hidden, weight = (x.hidden, x.weight) if model == "a" else x.model_b()
        return self.memo(("logp", model), lambda: naive64(hidden, weight, x.targets)[0])

    def grads(self, name: str, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad_hidden, grad_weight) of sum(grad * logp) of model a, cached under ``name`` in host memory
        (on a GPU, several float64 [V, D] gradients would crowd out the implementations measured)."""
        x = self.inputs

        def compute():
            return tuple(t.cpu() for t in naive64(x.hidden, x.weight, x.targets, grad, all_rows=False)[1:])
        return self.memo(("grads", name), compute)
