"""Per-token log-probs from hidden states (selpo's ``linear_logprobs``) against naive eager PyTorch, the same
under torch.compile, TRL's selective_log_softmax and its fused head, Cut Cross-Entropy and Liger-Kernel: the
forward, the forward+backward, and the backward alone with the upstream gradient on every row or on the 30% of
rows a selective loss keeps (the forward then runs before each round, untimed; memory still covers both)."""

from __future__ import annotations

import torch

from selpo.kernels.linear_logprobs import linear_logprobs
from selpo.kernels.linear_logprobs.naive import linear_logprobs_naive

from . import peers
from .harness import Impl, Step, floor_step, leaves, output_error, require_cuda_for_triton

NAME = "linear_logprobs"
MODES = {
    "fwd": "forward",
    "fwd+bwd": "forward+backward",
    "bwd": "backward alone, gradient on every row",
    "bwd-30%": "backward alone, gradient on the 30% selected rows",
}
# The matmuls each mode cannot avoid without holding [N, V] logits from the forward to the backward (see
# harness.floor_step): the backward recomputes them.
PRODUCTS = {
    "fwd": ("logits",),
    "fwd+bwd": ("logits", "logits", "grad_hidden", "grad_weight"),
    "bwd": ("logits", "grad_hidden", "grad_weight"),
    "bwd-30%": ("logits", "grad_hidden", "grad_weight"),
}


def upstream(case, x) -> torch.Tensor:
    return x.grad_masked if case.mode == "bwd-30%" else x.grad


def logprob_step(case, x, logp_fn) -> Step:
    """The Step of a per-token log-prob function ``logp_fn(hidden, weight, targets) -> [N]`` in the case's mode."""
    if case.mode == "fwd":
        def forward():
            with torch.no_grad():
                return {"logp": logp_fn(x.hidden, x.weight, x.targets)}
        return Step(timed=forward)
    hidden, weight = leaves(x.hidden, x.weight)
    grad = upstream(case, x)
    pending = []

    def clear():
        hidden.grad = weight.grad = None
        pending.clear()

    def grads(logp):
        logp.backward(grad.to(logp.dtype))
        return {"grad_hidden": hidden.grad, "grad_weight": weight.grad}

    if case.mode == "fwd+bwd":
        def forward_backward():
            logp = logp_fn(hidden, weight, x.targets)
            return {"logp": logp.detach(), **grads(logp)}
        return Step(timed=forward_backward, clear=clear)
    return Step(timed=lambda: grads(pending.pop()), clear=clear,
                before=lambda: pending.append(logp_fn(hidden, weight, x.targets)))


def op(make):
    """An Impl build from ``make(case) -> logp_fn``."""
    return lambda case, x: logprob_step(case, x, make(case))


def selpo(backend):
    def make(case):
        require_cuda_for_triton(backend, case.device)
        return lambda hidden, weight, targets: linear_logprobs(hidden, weight, targets, backend=backend)
    return make


def floor(case, x) -> Step:
    rows = x.hidden[x.mask] if case.mode == "bwd-30%" else x.hidden
    return floor_step([(rows, x.weight)], PRODUCTS[case.mode])


IMPLS = [
    Impl("selpo-torch", "selpo linear_logprobs, torch backend", op(selpo("torch")), role="selpo"),
    Impl("selpo-triton", "selpo linear_logprobs, triton backend", op(selpo("triton")), role="selpo"),
    Impl("naive", "naive eager: logits, log_softmax, gather", op(lambda case: linear_logprobs_naive),
         role="baseline", dense=4),
    Impl("naive-compile", "naive under torch.compile",
         op(lambda case: peers.compiled(linear_logprobs_naive, case.device)), dense=3),
    Impl("trl", "TRL selective_log_softmax on materialized logits",
         op(lambda case: peers.trl_logprobs(case.seg_len)), dense=3),
    Impl("trl-chunked", "TRL's fused head, ChunkedLogProbFunction", op(lambda case: peers.trl_chunked_logprobs())),
    Impl("cce-compile", "Cut Cross-Entropy, torch_compile impl",
         op(lambda case: peers.cce_logprobs("torch_compile", case.device)), dense=3),
    Impl("cce", "Cut Cross-Entropy, cce impl (Triton)", op(lambda case: peers.cce_logprobs("cce", case.device))),
    Impl("liger-flce", "Liger-Kernel fused linear cross-entropy", op(lambda case: peers.liger_logprobs(case.device))),
    Impl("floor", "matmuls alone (the floor)", floor, role="floor", dense=1),
]
# A backward alone compares selpo's sparse backward with the dense one; the peers are in forward+backward.
BACKWARD_ALONE = ("selpo-torch", "selpo-triton", "naive", "floor")


def impls(case) -> list[Impl]:
    return [i for i in IMPLS if not case.mode.startswith("bwd") or i.key in BACKWARD_ALONE]


def input_bytes(case, x) -> int:
    return x.nbytes("hidden", "weight", "targets") + (0 if case.mode == "fwd" else x.nbytes("grad"))


def kept_bytes(case, x) -> int:
    """The log-probs (float32) and, with a backward, the gradients of hidden and weight."""
    logp = 4 * case.n if case.mode in ("fwd", "fwd+bwd") else 0
    return logp + (0 if case.mode == "fwd" else x.nbytes("hidden", "weight"))


def expected(case, x, ref) -> dict:
    out = {"logp": ref.logp()} if case.mode in ("fwd", "fwd+bwd") else {}
    if case.mode != "fwd":
        out["grad_hidden"], out["grad_weight"] = ref.grads(case.mode.replace("fwd+", ""), upstream(case, x))
    return out


error = output_error
