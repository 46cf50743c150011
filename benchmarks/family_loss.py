"""The selective loss hot path: hidden states in, SePO's loss over the selected 30% of tokens and the
gradients of hidden and weight out. selpo's fused ``linear_selective_loss`` and its composition
``sepo_loss(linear_logprobs(...))`` against the naive full-logit forward+backward of the same loss, the
same under torch.compile, the same loss computed from Cut Cross-Entropy's and TRL's fused head's per-token
output (on every token, and on the selected tokens only), and Liger-Kernel's chunked SimPO loss made SePO's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selpo.kernels.linear_logprobs import linear_logprobs
from selpo.kernels.linear_logprobs.naive import linear_logprobs_naive
from selpo.kernels.losses import sepo_loss

from . import peers
from .harness import Impl, Step, floor_step, leaves, output_error, require_cuda_for_triton

NAME = "selective_loss"
MODES = {"fwd+bwd": "SePO loss forward+backward, 30% of tokens selected"}


def sepo_plain(logp, mask, segment_ids, num_segments, gamma=1.0, margin=0.0):
    """SePO's loss in plain PyTorch: the mean over pairs of -logsigmoid(gamma * (u_chosen - u_rejected) - margin),
    u the mean log-prob of a response's selected tokens (segments chosen_0.., then rejected_0..)."""
    selected = mask.to(logp.dtype)
    sums = torch.zeros(num_segments, dtype=logp.dtype, device=logp.device).index_add(0, segment_ids, logp * selected)
    u = sums / torch.zeros_like(sums).index_add(0, segment_ids, selected)
    pairs = num_segments // 2
    return -F.logsigmoid(gamma * (u[:pairs] - u[pairs:]) - margin).mean()


def loss_step(case, x, loss_fn) -> Step:
    """The Step of ``loss_fn(hidden, weight, inputs) -> 0-dim loss``: forward and backward."""
    hidden, weight = leaves(x.hidden, x.weight)

    def clear():
        hidden.grad = weight.grad = None

    def forward_backward():
        value = loss_fn(hidden, weight, x)
        value.backward()
        return {"loss": value.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}

    return Step(timed=forward_backward, clear=clear)


def op(make):
    """An Impl build from ``make(case) -> loss_fn``."""
    return lambda case, x: loss_step(case, x, make(case))


def from_logprobs(make_logp, selected_only=False):
    """``make`` of the SePO loss (plain PyTorch) over a per-token log-prob function made by ``make_logp(case)``;
    with ``selected_only`` the unselected tokens get ignore_index, so a peer that skips those skips them."""
    def make(case):
        logp_fn = make_logp(case)

        def loss(hidden, weight, x):
            targets = torch.where(x.mask, x.targets, -100) if selected_only else x.targets
            return sepo_plain(logp_fn(hidden, weight, targets), x.mask, x.segment_ids, x.num_segments)
        return loss
    return make


def naive_loss(hidden, weight, x):
    return sepo_plain(linear_logprobs_naive(hidden, weight, x.targets), x.mask, x.segment_ids, x.num_segments)


def selpo_fused(backend):
    def make(case):
        require_cuda_for_triton(backend, case.device)
        from selpo.kernels.selective_loss import linear_selective_loss

        return lambda hidden, weight, x: linear_selective_loss(hidden, weight, x.targets, x.cu_seqlens, mask=x.mask,
                                                                loss="sepo", backend=backend)[0]
    return make


def selpo_composed(backend):
    def make(case):
        require_cuda_for_triton(backend, case.device)
        return lambda hidden, weight, x: sepo_loss(linear_logprobs(hidden, weight, x.targets, backend=backend),
                                                   x.mask, x.cu_seqlens, backend=backend)[0]
    return make


def floor(case, x) -> Step:
    """The three products over the selected rows: the only logits the loss reads."""
    return floor_step([(x.hidden[x.mask], x.weight)], ("logits", "grad_hidden", "grad_weight"))


def cce(impl):
    return lambda case: peers.cce_logprobs(impl, case.device)


IMPLS = [
    Impl("selpo-fused-torch", "selpo linear_selective_loss, torch backend", op(selpo_fused("torch")), role="selpo"),
    Impl("selpo-fused-triton", "selpo linear_selective_loss, triton backend", op(selpo_fused("triton")), role="selpo"),
    Impl("selpo-composed-torch", "selpo sepo_loss(linear_logprobs), torch backend", op(selpo_composed("torch")),
         role="selpo"),
    Impl("selpo-composed-triton", "selpo sepo_loss(linear_logprobs), triton backend", op(selpo_composed("triton")),
         role="selpo"),
    Impl("naive", "naive eager: full logits, log_softmax, gather, SePO", op(lambda case: naive_loss),
         role="baseline", dense=4),
    Impl("naive-compile", "naive under torch.compile", op(lambda case: peers.compiled(naive_loss, case.device)),
         dense=3),
    Impl("cce-compile", "Cut Cross-Entropy torch_compile per-token, then SePO", op(from_logprobs(cce("torch_compile"))),
         dense=3),
    Impl("cce-compile-sel", "the same, unselected tokens ignored",
         op(from_logprobs(cce("torch_compile"), selected_only=True)), dense=1),
    Impl("cce", "Cut Cross-Entropy cce (Triton) per-token, then SePO", op(from_logprobs(cce("cce")))),
    Impl("cce-sel", "the same, unselected tokens ignored", op(from_logprobs(cce("cce"), selected_only=True))),
    Impl("trl-chunked", "TRL's fused head on every token, then SePO",
         op(from_logprobs(lambda case: peers.trl_chunked_logprobs()))),
    Impl("trl-chunked-sel", "the same, only the selected tokens through the head",
         op(from_logprobs(lambda case: peers.trl_chunked_logprobs(), selected_only=True))),
    Impl("liger-simpo", "Liger-Kernel chunked SimPO loss as SePO",
         op(lambda case: peers.liger_sepo_loss(case.seg_len, case.device))),
    Impl("floor", "matmuls alone over the selected rows (the floor)", floor, role="floor", dense=0.3),
]


def impls(case) -> list[Impl]:
    return IMPLS


def input_bytes(case, x) -> int:
    return x.nbytes("hidden", "weight", "targets", "mask", "cu_seqlens", "segment_ids")


def kept_bytes(case, x) -> int:
    """The loss and the gradients of hidden and weight."""
    return 4 + x.nbytes("hidden", "weight")


def expected(case, x, ref) -> dict:
    def compute():
        logp = ref.logp().clone().requires_grad_()
        value = sepo_plain(logp, x.mask, x.segment_ids, x.num_segments)
        (grad,) = torch.autograd.grad(value, logp)
        return value.detach(), *ref.grads("sepo", grad)
    value, grad_hidden, grad_weight = ref.memo("sepo", compute)
    return {"loss": value, "grad_hidden": grad_hidden, "grad_weight": grad_weight}


error = output_error
