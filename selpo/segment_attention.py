"""Attention that follows a packed or shared row (``selpo.data.packing.Segments``), through transformers' attention
interface: no model code is patched and no dense [T, T] mask is built.

``segment_attention(model)`` switches every config of the model to the implementation ``NAME`` (registered here
with ``AttentionInterface`` and ``AttentionMaskInterface``) and restores the previous ones on exit, also on an
exception. Nested uses are no-ops, so a caller may hold it around forward *and* backward.

How the layout reaches every attention layer: as its attention mask. The mask function registered under ``NAME``
returns a ``SegmentMask`` (the row's ``Segments``, read from a context variable that ``segmented_hidden_states``
sets around the body forward, and the window the model asked the mask for) instead of a tensor, and transformers
hands each layer the mask as an argument. Not model kwargs: transformers forwards those to the attention function
in most models but not all, while the mask is an argument of every layer that uses the interface; and activation
checkpointing replays a layer in the backward with its first call's arguments, so the replay gets the same
``SegmentMask`` long after a context variable was reset. The replay also reads the attention implementation
again: under activation checkpointing ``segment_attention(model)`` must be held until the backward is done
(``segmented_hidden_states`` refuses otherwise). A restored implementation handed a ``SegmentMask`` fails loudly.

Semantics: a prompt's tokens attend causally within the prompt; a response's tokens to their prompt and the earlier
tokens of their response. Every option transformers passes is honoured: ``scaling``; ``dropout``; ``sliding_window``
in positions (a query at position p sees keys at positions > p - window; taken from the mask when the layer does
not pass it); ``softcap`` (Gemma 2); ``s_aux`` / ``sinks`` (a per-head or per-query sink logit); grouped key/value
heads. A bidirectional layer (``is_causal`` False), an additive ``position_bias``, and a mask that is not causal
(bidirectional, chunked or block overlays) raise, so ``selpo.packing_check`` sends such a model to the padded path.

Work: per block, (its context + its queries) x its queries, causally: a prompt's triangle, a response's
(prompt + response) x response; never (tokens of the row)^2. Kernels (``KERNELS``), the first that can run a call
unless ``attention_kernel`` names one:

- ``flash``: CUDA with flash-attn 2 importable (the ``flash`` extra), half precision, no sinks: one
  ``flash_attn_varlen_func`` over the row, each block's keys (its context gathered before its own) at
  ``cu_seqlens_k``, ``causal=True`` (bottom-right aligned). Memory: the gathered keys and values, no scores.
- ``flex``: CUDA, no sinks, no dropout: torch's compiled ``flex_attention`` over the row with a block mask from the
  blocks (a key is seen when it is in the query's context or at or before it in its own block, within the window
  in positions), softcap as a score modification. Memory: no scores and no gather; the block mask, about
  (L / 128)^2 indices. Work: the 128 x 128 tiles the blocks touch, so short responses pay for partly used tiles.
  Torch runs it on CPU only uncompiled (the whole [L, L] score matrix) and without a backward: there it runs
  only when named, as a reference.
- ``sdpa``, everywhere: block by block, ``scaled_dot_product_attention``, or where it cannot express an option
  (softcap, sinks) the same computation written out. Memory: one block's scores at a time, heads x n_q x n_k for
  the largest (prompt + response) x response block, plus its [n_q, n_k] boolean mask; the written-out path keeps
  each block's probabilities for the backward as eager attention does (heads x ``Segments.score_entries`` in all).
  Like ``flash`` it gathers the keys and values once ([heads, sum of the blocks' key counts, head_dim], at most
  1 + K times the row).
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .data.packing import Segments
from .head import last_hidden_states
from .recompute import is_checkpointing

NAME = "selpo_segments"
KERNELS = ("flash", "flex", "sdpa")
_FLASH = importlib.util.find_spec("flash_attn") is not None
_SEGMENTS: contextvars.ContextVar[Segments | None] = contextvars.ContextVar("selpo_segments", default=None)
_KERNEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("selpo_attention_kernel", default=None)


@dataclass(frozen=True)
class SegmentMask:
    """What the ``NAME`` mask function returns for a layer in place of a tensor: the row's blocks and the sliding
    window (in positions) the model asked that layer's mask for, None for full causal attention."""

    segments: Segments
    window: int | None
    # What the layers of one forward (and its replay in the backward) share: the flex kernel's block masks.
    cache: dict = field(default_factory=dict, compare=False, repr=False)


@contextmanager
def attention_kernel(kernel: str | None):
    """Within the block, segment attention runs through ``kernel`` (one of ``KERNELS``; None: the first that can
    run each call) and raises where it cannot, saying why: for comparing the kernels, and for users who need one."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    token = _KERNEL.set(kernel)
    try:
        yield
    finally:
        _KERNEL.reset(token)


def segmented_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                            segments: Segments) -> torch.Tensor:
    """[1, L, D] the last hidden states of a packed or shared row (``selpo.data.PairBatch``): the body run with its
    attention following ``segments`` (``segment_attention``)."""
    if torch.is_grad_enabled() and model.training and is_checkpointing(model) \
            and model.config._attn_implementation != NAME:
        raise ValueError(f"model: activation checkpointing replays its layers in the backward, after this forward; "
                         f"hold `with segment_attention(model):` around the forward and the backward of a "
                         f"{segments.kind} batch, or use the padded layout")
    token = _SEGMENTS.set(segments)
    try:
        with segment_attention(model):
            return last_hidden_states(model, input_ids, torch.ones_like(input_ids), position_ids=position_ids)
    finally:
        _SEGMENTS.reset(token)


@contextmanager
def segment_attention(model):
    """Within the block, ``model`` (and every sub-model and sub-config) runs its attention as ``NAME``; the previous
    implementations are restored on exit. Raises if the model cannot take it (its attention does not go through
    transformers' ``AttentionInterface``)."""
    if model.config._attn_implementation == NAME:
        yield
        return
    saved = [(config, config._attn_implementation_internal) for config in _configs(model)]
    try:
        model.set_attn_implementation(NAME)
        if model.config._attn_implementation != NAME:
            raise ValueError(f"model: {type(model).__name__} cannot switch its attention implementation: its "
                             "attention does not go through transformers' AttentionInterface")
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation


def _configs(model) -> list:
    """Every config of ``model``: those of its sub-models, and their sub-configs at any depth."""
    found, todo = {}, [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "sub_configs")]
    while todo:
        config = todo.pop()
        if id(config) not in found:
            found[id(config)] = config
            todo += [sub for key in config.sub_configs if (sub := getattr(config, key, None)) is not None]
    return list(found.values())


def segment_mask(batch_size: int, q_length: int, kv_length: int, mask_function: Callable, q_offset=0, kv_offset=0,
                 local_size: int | None = None, **_) -> SegmentMask:
    """The mask function of ``NAME``: the row's ``SegmentMask``, once the mask the model asks for is checked to be
    causal within ``local_size`` positions (a sliding window; None: none), on the index pairs that tell it from
    bidirectional, chunked and undeclared windowed masks (within the row: a window longer than it changes nothing)."""
    segments = _SEGMENTS.get()
    if segments is None:
        raise RuntimeError(f"the {NAME!r} attention runs only within selpo.segment_attention.segmented_hidden_states")
    if (batch_size, q_length, kv_length, q_offset, kv_offset) != (1, segments.length, segments.length, 0, 0):
        raise ValueError(f"model: asked for a mask of batch {batch_size}, {q_length} queries at {q_offset} over "
                         f"{kv_length} keys at {kv_offset}, not the row's 1 x {segments.length}")
    window = local_size
    far = [(window - 1, 0), (window, 0), (window, window - 1)] if window else [(segments.length - 1, 0)]
    probes = [(0, 1), (1, 0), (2, 1), *far]
    for q, kv in probes:
        expected = kv <= q and (window is None or kv > q - window)
        if bool(mask_function(torch.tensor(0), torch.tensor(0), torch.tensor(q), torch.tensor(kv))) != expected:
            within = "" if window is None else f" within a window of {window}"
            raise ValueError(f"model: its attention mask is not causal{within} (query {q}, key {kv}): a "
                             "bidirectional, chunked or custom mask, which the segments cannot follow")
    return SegmentMask(segments, window)


def segment_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: SegmentMask, dropout: float = 0.0, scaling: float | None = None,
                              sliding_window: int | None = None, softcap: float | None = None,
                              is_causal: bool | None = None, s_aux: torch.Tensor | None = None,
                              sinks: torch.Tensor | None = None, position_bias: torch.Tensor | None = None,
                              **_) -> tuple[torch.Tensor, None]:
    """The attention function of ``NAME`` (transformers' signature: query [1, H, L, d], key and value
    [1, H_kv, L, d]; returns ([1, L, H, d_v], None)). Other keyword arguments transformers passes (position ids,
    ``output_attentions``, flash-attn's varlen lengths) do not change the result; weights are never returned."""
    if not isinstance(attention_mask, SegmentMask):
        raise TypeError(f"attention_mask must be the {NAME!r} mask, a SegmentMask, got {type(attention_mask).__name__}")
    if is_causal is False or not getattr(module, "is_causal", True):
        raise ValueError(f"{type(module).__name__}: bidirectional attention cannot follow causal segments")
    if position_bias is not None:
        raise ValueError(f"{type(module).__name__}: an additive position_bias is not supported by segment attention")
    if s_aux is not None and sinks is not None:
        raise ValueError(f"{type(module).__name__}: got both s_aux and sinks")
    window, asked = sliding_window, attention_mask.window
    if window is not None and asked is not None and window != asked:
        raise ValueError(f"{type(module).__name__}: sliding_window {window} differs from its mask's window {asked}")
    segments = attention_mask.segments
    if query.shape[0] != 1 or query.shape[2] != segments.length or key.shape[2] != segments.length:
        raise ValueError(f"query [{tuple(query.shape)}] and key [{tuple(key.shape)}] must be one row of the "
                         f"segments' {segments.length} tokens")
    options = dict(scaling=query.shape[-1] ** -0.5 if scaling is None else scaling, dropout=dropout,
                   window=asked if window is None else window, softcap=softcap)
    sink = s_aux if sinks is None else sinks
    kernel = _choose_kernel(query, value, sink, dropout)
    if kernel == "flash":
        return _flash(query, key, value, segments, **options), None
    if kernel == "flex":
        return _flex(query, key, value, attention_mask, **options), None
    return _blockwise(query, key, value, segments, sink=sink, **options), None


AttentionInterface.register(NAME, segment_attention_forward)
AttentionMaskInterface.register(NAME, segment_mask)


def _choose_kernel(query: torch.Tensor, value: torch.Tensor, sink: torch.Tensor | None, dropout: float) -> str:
    """The kernel ``attention_kernel`` names, else flash, flex, sdpa: the first that can run this call."""
    named = _KERNEL.get()
    if named is not None:
        reason = _cannot(named, query, value, sink, dropout)
        if reason:
            raise ValueError(f"attention kernel {named!r} cannot run this call: {reason}")
        return named
    return next(k for k in KERNELS if not _cannot(k, query, value, sink, dropout) and (k != "flex" or query.is_cuda))


def _cannot(kernel: str, query: torch.Tensor, value: torch.Tensor, sink: torch.Tensor | None,
            dropout: float) -> str | None:
    """Why ``kernel`` cannot run this call, None if it can."""
    if kernel == "flash":
        if not _FLASH:
            return "flash-attn is not installed (pip install 'selpo[flash]')"
        if not query.is_cuda or _half(query) is None:
            return (f"flash-attn runs on CUDA in half precision (or under autocast to it), got {query.dtype} on "
                    f"{query.device.type}")
        if query.shape[-1] != value.shape[-1] or query.shape[-1] > 256:
            return f"flash-attn takes one head dim of at most 256, got {query.shape[-1]} and {value.shape[-1]}"
    if kernel in ("flash", "flex") and sink is not None:
        return "the model's attention sinks"
    if kernel == "flex":
        if dropout:
            return "attention dropout"
        if not query.is_cuda and (query.requires_grad or value.requires_grad):
            return "torch's flex_attention has no backward on CPU"
    return None


def _half(query: torch.Tensor) -> torch.dtype | None:
    """The half precision flash-attn runs a call in: the queries' own, or under autocast to a half precision that
    one (a float32 model under bf16 autocast gives float32 queries from its rotary embedding and bf16 values; SDPA
    and flex cast them to the autocast's precision, as transformers' flash path does); None if neither."""
    halves = (torch.float16, torch.bfloat16)
    if query.dtype in halves:
        return query.dtype
    device = query.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return autocast if query.dtype == torch.float32 and autocast in halves else None


def _flash(query, key, value, segments: Segments, *, scaling, dropout, window, softcap) -> torch.Tensor:
    """[1, L, H, d] through ``flash_attn_varlen_func`` (flash-attn 2): queries and the gathered keys as varlen
    sequences, ``causal=True`` aligned bottom-right, ``window_size=(window - 1, 0)``; in ``_half``'s precision."""
    from flash_attn import flash_attn_varlen_func

    dtype = _half(query)

    def tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [1, h, L, d] -> [n, h, d]
        return (x if dtype is None else x.to(dtype))[0].transpose(0, 1).index_select(0, index)

    out = flash_attn_varlen_func(
        tokens(query, segments.query_index), tokens(key, segments.key_index), tokens(value, segments.key_index),
        segments.cu_seqlens_q, segments.cu_seqlens_k, segments.max_q, segments.max_k, dropout_p=dropout,
        softmax_scale=scaling, causal=True, window_size=(-1, -1) if window is None else (window - 1, 0),
        softcap=0.0 if softcap is None else softcap)
    poisoned = out.new_full((query.shape[2], *out.shape[1:]), float("nan"))
    return poisoned.index_copy(0, segments.query_index, out)[None]


def _flex(query, key, value, mask: SegmentMask, *, scaling, dropout, window, softcap) -> torch.Tensor:
    """[1, L, H, d_v] through torch's ``flex_attention`` over the row (compiled on CUDA), its block mask built
    once per window and mask (``_flex_block_mask``) and shared by the layers."""
    segments, n = mask.segments, mask.segments.length
    if ("flex", window) not in mask.cache:
        mask.cache["flex", window] = _flex_block_mask(segments, window, query.device)

    def soft_capped(score, b, h, q, kv):
        return torch.tanh(score / softcap) * softcap

    run = _compiled_flex() if _compiles(query.device) else flex_attention
    with warnings.catch_warnings():  # uncompiled (the CPU reference) it warns of the scores it builds
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile", UserWarning)
        out = run(query[:, :, :n], key[:, :, :n], value[:, :, :n], score_mod=None if softcap is None else soft_capped,
                  block_mask=mask.cache["flex", window], scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    if n < query.shape[2]:  # queries no block holds stay poisoned
        out = torch.cat([out, out.new_full((*out.shape[:2], query.shape[2] - n, out.shape[3]), float("nan"))], 2)
    return out.transpose(1, 2)


def _compiles(device: torch.device) -> bool:
    """Whether flex runs compiled (fused, no score matrix) on ``device``: on CUDA, where it also has a backward."""
    return device.type == "cuda"


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)


def _flex_block_mask(segments: Segments, window: int | None, device: torch.device) -> BlockMask:
    """The block mask of ``segments``' row (its first ``length`` tokens): query i of block b sees key j
    in b's context or in ``[b's first query, i]``, and, with a window, only where the positions differ by less."""
    starts, stops, context_starts, context_stops = (torch.tensor(x, device=device)
                                                    for x in zip(*segments.blocks))
    block_of = torch.repeat_interleave(torch.arange(len(segments.blocks), device=device), stops - starts)
    # A token's position in its block's keys: after its block's context, then its place among the queries.
    position = torch.arange(segments.length, device=device) + (context_stops - context_starts - starts)[block_of]

    def seen(b, h, q, kv):
        block = block_of[q]
        allowed = ((kv >= starts[block]) & (kv <= q)) | ((kv >= context_starts[block]) & (kv < context_stops[block]))
        return allowed if window is None else allowed & (position[q] - position[kv] < window)

    n = segments.length
    return create_block_mask(seen, 1, None, n, n, device=device, _compile=_compiles(device))


def _blockwise(query, key, value, segments: Segments, *, scaling, dropout, window, softcap, sink) -> torch.Tensor:
    """[1, L, H, d_v] block by block, through SDPA or, for softcap and sinks, written out (``_written_out``)."""
    keys, values = key.index_select(2, segments.key_index), value.index_select(2, segments.key_index)
    queries = query.index_select(2, segments.query_index)
    if sink is not None:  # [H] per head, or [1, H, L, 1] per query
        sink = sink.reshape(1, -1, 1, 1) if sink.dim() == 1 else sink.index_select(2, segments.query_index)
    gqa = query.shape[1] != key.shape[1]
    parts = []
    for b in range(len(segments.blocks)):
        (q0, q1), (k0, k1) = segments.cu_q[b:b + 2], segments.cu_k[b:b + 2]
        q, k, v = queries[:, :, q0:q1], keys[:, :, k0:k1], values[:, :, k0:k1]
        allowed = _allowed(q1 - q0, k1 - k0, window, query.device)
        if softcap is None and sink is None:
            parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                        is_causal=allowed is None, scale=scaling, enable_gqa=gqa))
        else:
            block_sink = None if sink is None else sink if sink.shape[2] == 1 else sink[:, :, q0:q1]
            parts.append(_written_out(q, k, v, allowed, scaling, dropout, softcap, block_sink))
    out = torch.cat(parts, 2)  # in SDPA's dtype: under CUDA's autocast bf16 from float32 queries (seen on an H200)
    poisoned = out.new_full((*query.shape[:3], value.shape[-1]), float("nan"))
    return poisoned.index_copy(2, segments.query_index, out).transpose(1, 2)


def _allowed(n_q: int, n_k: int, window: int | None, device) -> torch.Tensor | None:
    """[n_q, n_k] which keys each query of a block sees: keys hold positions 0..n_k-1, the queries the last n_q of
    them; causal, and within ``window`` positions. None where SDPA's own top-left causal mask is the same."""
    if n_q == n_k and (window is None or window >= n_k):
        return None
    at = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    kv = torch.arange(n_k, device=device)[None, :]
    return (kv <= at) & (kv > at - window) if window is not None else kv <= at


def _written_out(q, k, v, allowed, scaling, dropout, softcap, sink) -> torch.Tensor:
    """Attention as transformers' eager functions compute it: soft-capped scores, a sink logit that takes
    probability mass and no value, the softmax in float32."""
    if k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is None:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sink is not None:
        scores = torch.cat([scores, sink.to(scores.dtype).expand(*scores.shape[:-1], 1)], -1)
    probs = scores.float().softmax(-1).to(q.dtype)
    if sink is not None:
        probs = probs[..., :-1]
    if dropout:
        probs = F.dropout(probs, dropout)
    return probs @ v
