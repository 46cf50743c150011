"""LoRA-adapted layers (PEFT's ``lora.Linear``) as ``selpo.lean_body`` runs them in place of PEFT's forward: a lean
SwiGLU MLP, one autograd function over the frozen base weights and the adapters' low-rank factors; and a lone
adapted projection (``lora_linear``, e.g. the attention's) whose adapter's part costs no pass over its output.

Each projection is ``proj(x) = x W^T + s (x A^T) B^T`` (W frozen, A [r, in], B [out, r], s = alpha / r), the MLP
``down(silu(gate(x)) * up(x))``. PEFT's forward runs each projection as three modules and the MLP as eager ops,
so autograd keeps x, gate(x), silu(gate(x)), up(x) and their product (four [tokens, intermediate] tensors) besides
the rank-r products. ``lora_swiglu_mlp`` keeps x, gate(x), up(x) and the three [tokens, r] products s x A^T, and
recomputes silu(gate(x)) and the product in the backward (elementwise). Its backward computes the gradients of x
and of each A and B, and a base weight's only when it requires one (under LoRA it is frozen: no GEMM for it).

Stored, not recomputed: gate(x) and up(x) could be rebuilt in the backward from x and the saved rank-r products
(two [tokens, hidden] x [hidden, intermediate] GEMMs), storing almost nothing. Measured on CPU (2 threads, float32,
a shared machine) at SmolLM2-135M's layer shape (hidden 576, intermediate 1536, rank 16 on all three projections),
forward and backward of one MLP, median of 6: at 2048 tokens PEFT's forward 184-202 ms and 53 MiB stored, this one
154-202 ms and 29 MiB, recomputing 209-275 ms and 5 MiB; at 4096 tokens 530, 321 and 572 ms (106, 58 and 10 MiB).
Recomputing costs more time than PEFT's forward takes (those two GEMMs are a third of the MLP's work, and a LoRA
step's backward runs no frozen weight's GEMM to hide them behind), while storing is no slower than PEFT and halves
what the MLP stores; a step that needs less memory than that runs gradient checkpointing.

Each adapted projection, in the MLP and alone, has its base GEMM accumulate onto the adapter's part (``_project``):
two elementwise passes over its output fewer than PEFT's forward, in the forward and in checkpointing's recomputation,
and the recomputation of a layer skips the base GEMM of its last projection. SmolLM2-135M's body with LoRA on every
projection, 16 rows of 256 tokens, checkpointed, forward and backward on 2 CPU threads in float32: 18.17 s, against
20.46 s with the modules' own forwards (``python -m benchmarks.recompute_check --lora --rounds 3``, medians,
2026-12-04 21:55 UTC; stored: 13.28 s).

Values and gradients are PEFT's up to rounding: ``x w^T + (s x a^T) b^T`` where PEFT computes
``x w^T + s ((x a^T) b^T)``; under autocast the same GEMMs in bf16, with one rounding of the sum fewer. The
backward (which autocast does not reach) runs in the dtype the forward's GEMMs ran in, as ``selpo.lean_body``'s MLP
does, and hands back each gradient in its input's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Projection(NamedTuple):
    """One projection as the lean MLP computes it: ``x weight^T + scale (x a^T) b^T``; ``a`` and ``b`` None for a
    projection without an (enabled) adapter."""

    weight: torch.Tensor
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scale: float = 0.0


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _project(x, w, a, b, s):
    """``x w^T + s (x a^T) b^T`` and the scaled rank-r product ``s x a^T`` (None without an adapter). The adapter's
    part comes first and the base GEMM accumulates onto it in place (``addmm_``, the dtypes autocast would give):
    no elementwise pass over the [tokens, out] output, where PEFT's forward runs two (the scale and the sum), and
    one launch fewer in the forward. Under autograd (``lora_linear``) the last tensor a projection saves is then its
    base weight, saved before that GEMM runs, so gradient checkpointing's recomputation of a layer stops before the
    base GEMM of the layer's last projection (the MLP's down projection), whose output no backward reads."""
    if a is None:
        return F.linear(x, w), None
    rows = _rows(x)
    low = F.linear(rows, a) * s
    out = F.linear(low, b)
    out.addmm_(rows.to(out.dtype), w.t().to(out.dtype))
    return out.view(*x.shape[:-1], w.shape[0]), low


def lora_linear(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """PEFT's ``lora.Linear`` (no dropout, no bias) as ``_project`` computes it, differentiated by autograd: its
    backward computes the gradients of x, a and b (and of the base weight only if it requires one)."""
    return _project(x, p.weight, p.a, p.b, p.scale)[0]


class _LoRASwiGLU(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` over LoRA-adapted projections, saving x, gate(x), up(x) and each adapter's
    scaled [tokens, r] product."""

    @staticmethod
    def forward(ctx, x, scales, gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b):
        gate, gate_low = _project(x, gate_w, gate_a, gate_b, scales[0])
        up, up_low = _project(x, up_w, up_a, up_b, scales[1])
        out, down_low = _project(F.silu(gate) * up, down_w, down_a, down_b, scales[2])
        ctx.scales, ctx.dtype = scales, gate.dtype
        ctx.save_for_backward(x, gate, up, gate_low, up_low, down_low, gate_w, gate_a, gate_b, up_w, up_a, up_b,
                              down_w, down_a, down_b)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, gate, up, gate_low, up_low, down_low, *weights = ctx.saved_tensors
        (gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b) = weights
        need = ctx.needs_input_grad
        dtype, (s_gate, s_up, s_down) = ctx.dtype, ctx.scales

        def cast(t):
            return None if t is None else t.to(dtype)

        xs, grad = _rows(x).to(dtype), _rows(grad).to(dtype)
        gate, up = _rows(gate), _rows(up)
        act = F.silu(gate)
        hidden = act * up if (need[8] or need[9]) else None

        d_hidden = grad @ cast(down_w)
        d_down_w = (grad.T @ hidden).to(down_w.dtype) if need[8] else None
        d_down_a = d_down_b = None
        if down_a is not None:
            d_low = (grad @ cast(down_b)).mul_(s_down)
            d_down_b = (grad.T @ down_low).to(down_b.dtype) if need[10] else None
            d_down_a = (d_low.T @ hidden).to(down_a.dtype) if need[9] else None
            d_hidden.addmm_(d_low, cast(down_a))
        del hidden
        d_up = d_hidden * act
        d_gate = torch.ops.aten.silu_backward(d_hidden.mul_(up), gate)
        del d_hidden, act

        d_x = torch.addmm(d_gate @ cast(gate_w), d_up, cast(up_w)) if need[0] else None
        grads = []
        for d, low, w, a, b, s, (nw, na, nb) in ((d_gate, gate_low, gate_w, gate_a, gate_b, s_gate, need[2:5]),
                                                 (d_up, up_low, up_w, up_a, up_b, s_up, need[5:8])):
            d_w = (d.T @ xs).to(w.dtype) if nw else None
            d_a = d_b = None
            if a is not None:
                d_low = (d @ cast(b)).mul_(s)
                d_b = (d.T @ low).to(b.dtype) if nb else None
                d_a = (d_low.T @ xs).to(a.dtype) if na else None
                if d_x is not None:
                    d_x.addmm_(d_low, cast(a))
            grads += [d_w, d_a, d_b]
        d_x = None if d_x is None else d_x.view(x.shape).to(x.dtype)
        return (d_x, None, *grads, d_down_w, d_down_a, d_down_b)


def lora_swiglu_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection) -> torch.Tensor:
    """A bias-free SwiGLU MLP over LoRA-adapted projections (``Projection``: a frozen weight and, or not, an
    adapter's factors and scale), ``down(silu(gate(x)) * up(x))`` as PEFT computes it, storing x, gate(x), up(x)
    and the rank-r products for its backward."""
    parts = (gate, up, down)
    scales = tuple(float(p.scale) for p in parts)
    return _LoRASwiGLU.apply(x, scales, *(t for p in parts for t in (p.weight, p.a, p.b)))


def is_lora_linear(module: nn.Module) -> bool:
    """Whether ``module`` is PEFT's LoRA layer over an ``nn.Linear`` (``peft.tuners.lora.Linear`` itself)."""
    if not hasattr(module, "lora_A"):
        return False
    from peft.tuners.lora import Linear

    return type(module) is Linear


def projection(module: nn.Module) -> Projection | None:
    """What ``module`` computes now, as a ``Projection``: a bias-free ``nn.Linear``; or PEFT's LoRA layer over one,
    with its adapter disabled (the base alone) or one active adapter of plain LoRA (no dropout, no DoRA or other
    variant, no bias, the adapter's weights in the base weight's dtype), not merged. None for anything else: the
    MLP then runs its own forward."""
    if type(module) is nn.Linear:
        return Projection(module.weight) if module.bias is None else None
    if not is_lora_linear(module):
        return None
    base = module.get_base_layer()
    if type(base) is not nn.Linear or base.bias is not None or module.merged:
        return None
    if module.disable_adapters:
        return Projection(base.weight)
    if len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}) or \
            getattr(module, "use_dora", {}).get(name, False) or not isinstance(module.lora_dropout[name], nn.Identity):
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None or \
            not a.weight.dtype == b.weight.dtype == base.weight.dtype:
        return None
    return Projection(base.weight, a.weight, b.weight, float(module.scaling[name]))


def lora_mlp_forward(module: nn.Module):
    """The lean forward of a SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj``, SiLU) with LoRA-adapted
    projections, or None when its projections are not (all) what ``projection`` takes or none carries an adapter.
    At each call it reads the projections' state again (an adapter disabled, ``selpo.lora.adapter_disabled``:
    the base MLP) and runs the module's own forward when one is not what ``projection`` takes any more."""
    linears = [getattr(module, name, None) for name in PROJECTIONS]
    if not any(is_lora_linear(m) for m in linears if m is not None) or \
            any(m is None or projection(m) is None for m in linears):
        return None
    own = type(module).forward

    def forward(x):
        parts = [projection(getattr(module, name)) for name in PROJECTIONS]
        if any(p is None for p in parts):
            return own(module, x)
        return lora_swiglu_mlp(x, *parts)

    return forward


def lora_linear_forward(module: nn.Module):
    """The lean forward of PEFT's LoRA layer over an ``nn.Linear`` (``lora_linear``), or None when it is not what
    ``projection`` takes. At each call it reads the layer's state again (an adapter disabled: the base GEMM alone)
    and runs PEFT's forward when the layer is not what ``projection`` takes any more, or is called with more than
    its input (PEFT's per-row ``adapter_names``)."""
    if not is_lora_linear(module) or projection(module) is None:
        return None
    own = type(module).forward

    def forward(x, *args, **kwargs):
        part = None if args or kwargs else projection(module)
        return own(module, x, *args, **kwargs) if part is None else lora_linear(x, part)

    return forward
