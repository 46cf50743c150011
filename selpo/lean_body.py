"""A model body that stores fewer activations for the backward: its SwiGLU MLPs and RMSNorms, swapped for the
duration of a training (``lean_body``) for autograd functions that keep only their inputs.

Eager autograd keeps every intermediate an op's backward reads. A SwiGLU MLP, ``down(silu(gate(x)) * up(x))``,
keeps x, gate(x), silu(gate(x)), up(x) and their product: four [tokens, intermediate] tensors, about half of a
Llama layer's stored activations. ``swiglu_mlp`` keeps x, gate(x) and up(x) and recomputes the other two in
the backward (two elementwise ops beside nine GEMMs). An RMSNorm keeps its input and the normalised input;
``rms_norm`` keeps the input and one scalar per row. Values and gradients are the eager ones up to rounding;
the saving is in what the stored activations of a training step weigh (with gradient checkpointing, in the one
layer being recomputed at a time), and the RMSNorm's backward runs fewer passes.

A model's modules are swapped only where they compute what these functions compute: a module qualifies by
its parts (``gate_proj``, ``up_proj``, ``down_proj`` linear layers without bias and a SiLU ``act_fn``; or a
class named ``*RMSNorm`` with a vector ``weight`` and an epsilon), and then its own forward is run against
the lean one on a random input (a few rows, once per module: milliseconds; equal within float32 reassociation, or
in a half dtype a few of its roundings); one whose forward differs (Gemma's ``1 + weight`` norm, an MLP with dropout
or a multiplier) keeps its own.

Under LoRA (``selpo.lora``) a plain MLP or RMSNorm over frozen weights is swapped, and its backward skips the frozen
weights' gradients (for the MLP, their three GEMMs); an MLP whose projections carry an adapter (PEFT's layers, one
active adapter without dropout) runs ``selpo.lean_lora``'s MLP, which keeps x, gate(x), up(x) and the rank-r
products and computes the adapters' gradients only, and the base MLP while the adapter is disabled; any other
adapted projection (the attention's; the MLP's under ``mlp=False``) runs ``selpo.lean_lora.lora_linear``, whose base
GEMM accumulates onto the adapter's part. With dropout (or another LoRA variant) they keep PEFT's forward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .lean_lora import PROJECTIONS, lora_linear_forward, lora_mlp_forward

VERIFY_ROWS = 5  # rows of the random input each module is checked on
VERIFY_RTOL = 1e-4  # float32 reassociation
VERIFY_ATOL = 1e-5
# In a half dtype: this many of its epsilons, relative and of the largest output (roundings done in another order,
# e.g. a LoRA projection's, selpo.lean_lora); a module that computes something else is off by far more.
VERIFY_EPS_FACTOR = 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _SwiGLU(torch.autograd.Function):
    """``down(silu(x @ gate.T) * (x @ up.T))``, saving x, x @ gate.T and x @ up.T.

    Under autocast the GEMMs run in the autocast dtype as ``nn.Linear``'s would; the backward (which autocast
    does not reach) casts the saved input and the weights to the dtype the forward's GEMMs ran in, and hands
    back each gradient in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, gate_w, up_w, down_w):
        gate = F.linear(x, gate_w)
        up = F.linear(x, up_w)
        out = F.linear(F.silu(gate).mul_(up), down_w)
        ctx.save_for_backward(x, gate, up, gate_w, up_w, down_w)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, gate, up, gate_w, up_w, down_w = ctx.saved_tensors
        dtype = gate.dtype
        gate, up, grad = _rows(gate), _rows(up), _rows(grad).to(dtype)
        xs = _rows(x).to(dtype)
        act = F.silu(gate)
        # A frozen weight (a LoRA model's base, selpo.lora) gets no gradient: its GEMM is not run.
        need_gate, need_up, need_down = ctx.needs_input_grad[1:4]
        d_hidden = grad @ down_w.to(dtype)
        d_down = (grad.T @ (act * up)).to(down_w.dtype) if need_down else None
        d_up = d_hidden * act
        d_gate = torch.ops.aten.silu_backward(d_hidden.mul_(up), gate)
        d_x = torch.addmm(d_gate @ gate_w.to(dtype), d_up, up_w.to(dtype))
        return (d_x.view(x.shape).to(x.dtype), (d_gate.T @ xs).to(gate_w.dtype) if need_gate else None,
                (d_up.T @ xs).to(up_w.dtype) if need_up else None, d_down)


def swiglu_mlp(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """A bias-free SwiGLU MLP, ``F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)``, that
    saves three tensors for its backward instead of five."""
    return _SwiGLU.apply(x, gate_w, up_w, down_w)


class _RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, the mean in float32 at least (as Llama's), saving x
    and the per-row rsqrt."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (wide * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        d_weight = _rows(grad * normed.to(x.dtype)).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        d_normed = (grad * weight).to(rstd.dtype)
        d_x = (d_normed - normed * (d_normed * normed).mean(-1, keepdim=True)).mul_(rstd)
        return d_x.to(x.dtype), d_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, saving its input and one scalar per row for the backward."""
    return _RMSNorm.apply(x, weight, eps)


def _norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _lean_forward(module: nn.Module, mlp: bool):
    """The lean forward that may replace ``module``'s, judged from its parts alone (None when none applies),
    and the width of its input. It reads the parameters at each call, as the module's own forward does
    (wrappers such as FSDP swap them)."""
    linears = [getattr(module, name, None) for name in PROJECTIONS]
    if mlp and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
        if all(isinstance(m, nn.Linear) and m.bias is None for m in linears):
            return (lambda x: swiglu_mlp(x, module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight),
                    module.gate_proj.in_features)
        adapted = lora_mlp_forward(module)  # LoRA-adapted projections (PEFT's layers)
        if adapted is not None:
            return adapted, module.gate_proj.in_features
    adapted = lora_linear_forward(module)  # one adapted projection (an attention's, or an MLP's left to its own)
    if adapted is not None:
        return adapted, module.in_features
    weight, eps = getattr(module, "weight", None), _norm_eps(module)
    if type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1 \
            and eps is not None and not list(module.children()):
        return (lambda x: rms_norm(x, module.weight, eps)), weight.shape[0]
    return None


@torch.no_grad()
def _same_forward(module: nn.Module, lean, width: int) -> bool:
    """Whether ``lean`` gives what ``module``'s own forward gives on a random input (seeded, in its dtype), within
    ``VERIFY_RTOL`` and ``VERIFY_ATOL``, or in a half dtype ``VERIFY_EPS_FACTOR`` of its epsilons."""
    param = next(module.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, VERIFY_ROWS, width, generator=generator).to(param.device, param.dtype)
    with torch.autocast(param.device.type, enabled=False):
        own, new = module(x), lean(x)
    if own.shape != new.shape or own.dtype != new.dtype:
        return False
    eps = VERIFY_EPS_FACTOR * torch.finfo(own.dtype).eps if own.dtype.is_floating_point else 0.0
    return torch.allclose(new, own, rtol=max(VERIFY_RTOL, eps), atol=max(VERIFY_ATOL, eps * float(own.abs().max())))


@contextlib.contextmanager
def lean_body(model: nn.Module, *, mlp: bool = True):
    """Within the block, every SwiGLU MLP (unless ``mlp`` is False), RMSNorm and other LoRA-adapted projection of
    ``model`` that computes what ``swiglu_mlp``, ``rms_norm`` or ``selpo.lean_lora`` compute runs them instead;
    yields the qualified names of the swapped modules (not those inside a swapped one). The modules' own forwards
    are back when the block ends, however it ends.

    Under gradient checkpointing pass ``mlp=False``: a layer's activations then live one layer at a time, so the
    MLP's saving is small, and it would cost time. Checkpointing stops a layer's recomputation once the last
    tensor its backward needs is saved; an eager MLP's last one is the down projection's input (LoRA-adapted,
    ``lora_linear``: its base weight), saved before that GEMM runs, while an autograd function's are saved when
    its forward returns, after it.
    """
    swapped: list[tuple[str, nn.Module]] = []
    inside = None  # the prefix of the last swapped module's submodules, which its lean forward does not call
    try:
        for name, module in model.named_modules():  # a module, then its submodules
            if inside is not None and name.startswith(inside):
                continue
            found = _lean_forward(module, mlp)
            if found is None or "forward" in module.__dict__:  # an instance's own forward is someone's patch
                continue
            if _same_forward(module, *found):
                module.forward = found[0]
                swapped.append((name, module))
                inside = f"{name}." if name else ""
        yield [name for name, _ in swapped]
    finally:
        for _, module in swapped:
            del module.forward
