"""Activation checkpointing for training: each transformer layer recomputed in the backward, but for its attention.

A checkpointed layer keeps only its input and reruns its forward before its backward. ``keep_attention`` makes
that selective (``torch.utils.checkpoint``'s selective activation checkpointing): what the attention kernels
return (those of ``scaled_dot_product_attention`` on CPU and CUDA, and flash-attn's: the output and a
log-sum-exp per token and head) is kept from the forward, and the rerun reads it instead of running the kernel
again. That costs one [tokens, hidden] tensor per layer and saves the attention kernel's second run, the part of
a layer whose cost grows with the sequence length; the projections, norms and MLP are recomputed as before. A
model whose attention runs through none of these kernels (eager attention) is checkpointed as without the option.

The policy is a Python function that torch's dispatch asks about every operator of the forward and of its
recomputation, so it costs host time per operator: where the step waits on the host (a small model, short rows) it
doubled the checkpointed step (``benchmarks/recompute_check.py``: 143 against 272 ms on a host-bound CPU case; a
LoRA step of SmolLM2 on an H200, 0.78 s against TRL's 0.31 s; both 2026-12-04), where it saves 2% of a
compute-bound one (SmolLM2 on 2 CPU cores, 12.55 against 12.80 s, 2026-12-01). Hence off by default
(``train.keep_attention``).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# The forward kernels behind torch.nn.functional.scaled_dot_product_attention, and flash-attn's (registered as
# torch ops from flash-attn 2.6 on; transformers' flash_attention_2 calls them), by name: a build that lacks one
# never dispatches it.
ATTENTION_OPS = frozenset({
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward"})


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The policy: keep what the attention kernels return, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op.name() in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def enable_gradient_checkpointing(model: torch.nn.Module, *, keep_attention: bool = False) -> None:
    """Non-reentrant activation checkpointing of ``model``'s layers, keeping the attention kernels' outputs
    when ``keep_attention``, under the name the installed transformers gives it so that nothing warns:
    ``activation_checkpointing_enable`` where it exists (there ``gradient_checkpointing_enable`` is a
    deprecated alias), else ``gradient_checkpointing_enable``. Torch warns unless ``use_reentrant`` is set."""
    options = {"use_reentrant": False}
    if keep_attention:
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model``'s layers are checkpointed, under the installed transformers' name for it
    (``is_activation_checkpointing``, where ``is_gradient_checkpointing`` is a deprecated alias; the latter alone
    before, e.g. 5.17)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    return model.is_gradient_checkpointing if checkpointing is None else checkpointing
