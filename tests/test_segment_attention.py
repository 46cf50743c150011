"""The attention that follows a packed or shared row, against dense attention over the whole row under the mask
the layout means (built here from the pairs' lengths, not from the blocks): values and gradients, every option
transformers passes, the flash-attn path's varlen arguments (through a stand-in kernel with flash-attn 2's
documented semantics), the flex path's block mask (its forward, which torch runs uncompiled on CPU), the choice of
kernel and what each refuses, outputs that start poisoned, the mask check, and the implementation switch."""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest
import torch
from test_head_conformance import ARCHITECTURES, build
from test_packing import arch_config
from transformers import masking_utils

import selpo.segment_attention as sa
from selpo.data.packing import pack_row
from selpo.packing_check import packing_check
from selpo.segment_attention import (
    NAME,
    SegmentMask,
    attention_kernel,
    segment_attention,
    segment_attention_forward,
    segment_mask,
)

TOL = 1e-5
# Groups of (prompt length, response lengths): uneven, a one-token response, K = 3.
GROUPS = [(6, [3, 1, 5]), (2, [4, 2, 1]), (9, [1, 3, 2])]


def layout(kind: str):
    """(the row's Segments, [L] position ids, [L, L] the dense mask the layout means)."""
    prompts = [list(range(p)) for p, _ in GROUPS]
    responses = [[list(range(r[k])) for _, r in GROUPS] for k in range(3)]
    row = pack_row(prompts, responses, kind)
    # Each token's (sequence, part): part -1 for a prompt's tokens, k for response k's; packed copies the prompt
    # into every sequence, so all its tokens are part -1 of their own sequence.
    labels = []
    if kind == "shared":
        for g, (p, lengths) in enumerate(GROUPS):
            labels += [(g, -1)] * p + [(g, k) for k, n in enumerate(lengths) for _ in range(n)]
    else:
        for k in range(3):
            for g, (p, lengths) in enumerate(GROUPS):
                labels += [(k * len(GROUPS) + g, -1)] * (p + lengths[k])
    seq, part = (torch.tensor(x) for x in zip(*labels))
    pos = row.position_ids[0]
    dense = ((seq[:, None] == seq[None]) & ((part[None] == -1) | (part[None] == part[:, None]))
             & (pos[None] <= pos[:, None]))
    return row.segments, pos, dense


def reference(q, k, v, dense, pos, *, scaling, window=None, softcap=None, sink=None):
    """[1, L, H, d_v] eager attention over the whole row in float64 under ``dense`` (and the window)."""
    q, k, v = (x.double() for x in (q, k, v))
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    allowed = dense if window is None else dense & (pos[None] > pos[:, None] - window)
    scores = q @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sink is not None:
        sink = sink.double().reshape(1, -1, 1, 1) if sink.dim() == 1 else sink.double()
        scores = torch.cat([scores, sink.expand(*scores.shape[:-1], 1)], -1)
    probs = scores.softmax(-1)
    return (probs[..., :allowed.shape[1]] @ v).transpose(1, 2)


def inputs(length: int, heads: int = 4, kv_heads: int = 2, dim: int = 8, v_dim: int = 8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=g).requires_grad_()
    k = torch.randn(1, kv_heads, length, dim, generator=g).requires_grad_()
    v = torch.randn(1, kv_heads, length, v_dim, generator=g).requires_grad_()
    return q, k, v


def grads(out: torch.Tensor, leaves) -> list[torch.Tensor]:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return torch.autograd.grad((out * w).sum(), leaves)


CASES = {
    "plain": {},
    "window": dict(sliding_window=3),
    "window-from-the-mask": dict(mask_window=3),
    "softcap": dict(softcap=1.5),
    "head-sinks": dict(sink="head"),
    "query-sinks-window-softcap": dict(sink="query", sliding_window=4, softcap=2.0),
    "mha-value-dim": dict(kv_heads=4, v_dim=6),
    "one-kv-head-scaling": dict(kv_heads=1, scaling=0.2),
}


@pytest.mark.parametrize("kind", ["shared", "packed"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_values_and_gradients_equal_dense_attention_under_the_layouts_mask(kind, case):
    options = dict(CASES[case])
    segments, pos, dense = layout(kind)
    q, k, v = inputs(segments.length, kv_heads=options.pop("kv_heads", 2), v_dim=options.pop("v_dim", 8))
    sink = options.pop("sink", None)
    if sink is not None:
        g = torch.Generator().manual_seed(2)
        shape = (q.shape[1],) if sink == "head" else (1, q.shape[1], segments.length, 1)
        sink = torch.randn(shape, generator=g).requires_grad_()
        options["s_aux" if sink.dim() == 1 else "sinks"] = sink
    mask = SegmentMask(segments, options.pop("mask_window", None))
    out, weights = segment_attention_forward(torch.nn.Module(), q, k, v, mask, **options)
    assert weights is None and torch.isfinite(out).all()
    scaling = options.get("scaling", q.shape[-1] ** -0.5)
    window = options.get("sliding_window", mask.window)
    expected = reference(q, k, v, dense, pos, scaling=scaling, window=window, softcap=options.get("softcap"),
                         sink=sink)
    assert float((out.detach().double() - expected.detach()).abs().max()) <= TOL
    leaves = [x for x in (q, k, v, sink) if x is not None]
    for got, want in zip(grads(out, leaves), grads(expected, leaves)):
        assert float((got.double() - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))


@torch.no_grad()
def test_the_window_is_in_positions_and_binds_here():
    """Without the window the outputs change: the sequences are longer than it."""
    segments, _, _ = layout("shared")
    q, k, v = inputs(segments.length)
    windowed = segment_attention_forward(torch.nn.Module(), q, k, v, SegmentMask(segments, None), sliding_window=3)[0]
    full = segment_attention_forward(torch.nn.Module(), q, k, v, SegmentMask(segments, None))[0]
    assert float((windowed - full).abs().max()) > 1e-2


@pytest.mark.parametrize("softcap", [None, 1.5], ids=["sdpa", "written-out"])
@torch.no_grad()
def test_dropout_is_applied(softcap):
    segments, _, _ = layout("packed")
    q, k, v = inputs(segments.length)
    run = [segment_attention_forward(torch.nn.Module(), q, k, v, SegmentMask(segments, None), softcap=softcap,
                                     dropout=p)[0] for p in (0.0, 0.0, 0.5)]
    assert torch.equal(run[0], run[1]) and torch.isfinite(run[2]).all()
    assert float((run[2] - run[0]).abs().max()) > 1e-2


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **_):
    """A CPU stand-in with flash-attn 2's documented semantics: sequence b's queries q[cu_q[b]:cu_q[b+1]] attend
    to k[cu_k[b]:cu_k[b+1]]; causal aligned bottom-right; query i sees keys in [i + n_k - n_q - left,
    i + n_k - n_q + right] (-1: unbounded); softcap c: c * tanh(s / c)."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and dropout_p == 0.0
    assert q.dtype == k.dtype == v.dtype, "flash-attn: query, key and value must have the same dtype"
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max_seqlen_q == max(b - a for a, b in zip(cu_q, cu_q[1:]))
    assert max_seqlen_k == max(b - a for a, b in zip(cu_k, cu_k[1:]))
    outs = []
    for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        qb, kb, vb = q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
        kb, vb = (x.repeat_interleave(qb.shape[0] // x.shape[0], dim=0) for x in (kb, vb))
        s = qb @ kb.transpose(-1, -2) * softmax_scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        diagonal = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
        j = torch.arange(k1 - k0)[None]
        allowed = torch.ones_like(s[0], dtype=torch.bool)
        if causal:
            allowed &= j <= diagonal
        if window_size[0] >= 0:
            allowed &= j >= diagonal - window_size[0]
        if window_size[1] >= 0:
            allowed &= j <= diagonal + window_size[1]
        outs.append((s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vb).transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def stand_in_flash(monkeypatch):
    """flash-attn's path on CPU: the stand-in kernel, named, with what keeps it to CUDA lifted."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    cannot = sa._cannot
    monkeypatch.setattr(sa, "_cannot", lambda kernel, *args: None if kernel == "flash" else cannot(kernel, *args))
    with attention_kernel("flash"):
        yield


@pytest.mark.parametrize("kind", ["shared", "packed"])
@pytest.mark.parametrize("options", [{}, dict(sliding_window=3, softcap=1.5)], ids=["plain", "window-softcap"])
def test_the_flash_path_builds_the_varlen_arguments_flash_attn_needs(stand_in_flash, kind, options):
    segments, pos, dense = layout(kind)
    q, k, v = inputs(segments.length)
    out = segment_attention_forward(torch.nn.Module(), q, k, v, SegmentMask(segments, None), **options)[0]
    expected = reference(q, k, v, dense, pos, scaling=q.shape[-1] ** -0.5, window=options.get("sliding_window"),
                         softcap=options.get("softcap"))
    assert float((out.detach().double() - expected.detach()).abs().max()) <= TOL


def test_the_flash_path_runs_in_the_autocast_precision(stand_in_flash):
    """A float32 model under bf16 autocast gives float32 queries and keys (its rotary embedding's) and bf16 values:
    flash-attn takes one half precision, so the path casts to the autocast's, as SDPA does, and returns bf16."""
    segments, _, _ = layout("shared")
    q, k, v = inputs(segments.length)
    mask = SegmentMask(segments, None)
    with torch.autocast("cpu", torch.bfloat16):
        out = segment_attention_forward(torch.nn.Module(), q, k, v.bfloat16(), mask)[0]
        with attention_kernel("sdpa"):
            sdpa = segment_attention_forward(torch.nn.Module(), q, k, v.bfloat16(), mask)[0]
    assert out.dtype == sdpa.dtype == torch.bfloat16
    assert float((out.float() - sdpa.float()).abs().max()) <= 2 ** -6
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_the_half_precision_flash_runs_in():
    x = torch.zeros(1, 2, 3, 4)
    assert sa._half(x) is None and sa._half(x.double()) is None
    assert sa._half(x.half()) == torch.float16 and sa._half(x.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16):
        assert sa._half(x) == torch.bfloat16 and sa._half(x.half()) == torch.float16 and sa._half(x.double()) is None


FLEX_CASES = [c for c in CASES if "sinks" not in c]


@pytest.mark.parametrize("kind", ["shared", "packed"])
@pytest.mark.parametrize("case", FLEX_CASES, ids=FLEX_CASES)
@torch.no_grad()
def test_the_flex_path_equals_dense_attention_under_the_layouts_mask(kind, case):
    """The flex kernel's forward, uncompiled on CPU (torch has no CPU backward for it): its block mask and score
    modification against the dense reference; the block mask built once for the layers that share the mask."""
    options = dict(CASES[case])
    segments, pos, dense = layout(kind)
    q, k, v = (x.detach() for x in inputs(segments.length, kv_heads=options.pop("kv_heads", 2),
                                          v_dim=options.pop("v_dim", 8)))
    mask = SegmentMask(segments, options.pop("mask_window", None))
    with attention_kernel("flex"):
        out = segment_attention_forward(torch.nn.Module(), q, k, v, mask, **options)[0]
        again = segment_attention_forward(torch.nn.Module(), q, k, v, mask, **options)[0]
    window = options.get("sliding_window", mask.window)
    expected = reference(q, k, v, dense, pos, scaling=options.get("scaling", q.shape[-1] ** -0.5), window=window,
                         softcap=options.get("softcap"))
    assert float((out.double() - expected).abs().max()) <= TOL
    assert torch.equal(out, again) and list(mask.cache) == [("flex", window)]


@pytest.mark.slow
@torch.no_grad()
def test_the_compiled_flex_path_equals_the_uncompiled_one(monkeypatch):
    """What CUDA runs, compiled by inductor (here for the CPU, forward only: about a minute): the block mask built
    by ``create_block_mask(_compile=True)`` and the fused kernel with a window and softcap."""
    segments, _, _ = layout("shared")
    q, k, v = (x.detach() for x in inputs(segments.length))
    options = dict(sliding_window=4, softcap=1.5)
    with attention_kernel("flex"):
        eager = segment_attention_forward(torch.nn.Module(), q, k, v, SegmentMask(segments, None), **options)[0]
        monkeypatch.setattr(sa, "_compiles", lambda device: True)
        compiled = segment_attention_forward(torch.nn.Module(), q, k, v, SegmentMask(segments, None), **options)[0]
    assert float((compiled - eager).abs().max()) <= TOL


def test_each_kernel_runs_where_it_can_and_a_named_one_says_why_it_cannot(monkeypatch):
    segments, _, _ = layout("shared")
    q, k, v = inputs(segments.length)
    mask = SegmentMask(segments, None)
    monkeypatch.setattr(sa, "_FLASH", True)  # importable or not, flash-attn's kernel is CUDA's
    assert sa._choose_kernel(q, v, None, 0.0) == "sdpa"  # flex only compiled: on CUDA
    for kernel, options, match in [("flash", {}, "runs on CUDA in half precision"),
                                   ("flex", {}, "no backward on CPU"),
                                   ("flex", dict(dropout=0.1), "attention dropout"),
                                   ("flex", dict(s_aux=q[0, :, 0, 0].detach()), "attention sinks")]:
        with attention_kernel(kernel), pytest.raises(ValueError, match=f"{kernel}.*{match}"):
            segment_attention_forward(torch.nn.Module(), q, k, v, mask, **options)
    monkeypatch.setattr(sa, "_FLASH", False)
    with attention_kernel("flash"), pytest.raises(ValueError, match="flash-attn is not installed"):
        segment_attention_forward(torch.nn.Module(), q.half(), k.half(), v.half(), mask)
    with pytest.raises(ValueError, match="kernel must be one of"):
        with attention_kernel("xformers"):
            pass


@pytest.mark.parametrize("path", ["blockwise", "flash", "flex"])
def test_outputs_start_poisoned(stand_in_flash, path):
    """A block the loop or the kernel skips leaves its tokens NaN instead of zeros."""
    segments, _, _ = layout("shared")
    cut = segments.cu_q[-2]
    skipped = replace(segments, blocks=segments.blocks[:-1], cu_q=segments.cu_q[:-1], cu_k=segments.cu_k[:-1],
                      query_index=segments.query_index[:cut], cu_seqlens_q=segments.cu_seqlens_q[:-1],
                      cu_seqlens_k=segments.cu_seqlens_k[:-1])
    q, k, v = inputs(segments.length)
    options = dict(scaling=0.3, dropout=0.0, window=None, softcap=None)
    if path == "flash":
        out = sa._flash(q, k, v, skipped, **options)
    elif path == "flex":
        out = sa._flex(q.detach(), k.detach(), v.detach(), SegmentMask(skipped, None), **options)
    else:
        out = sa._blockwise(q, k, v, skipped, sink=None, **options)
    assert out.shape[1] == segments.length > cut
    assert out[:, cut:].isnan().all() and torch.isfinite(out[:, :cut]).all()


def test_the_blockwise_path_returns_the_kernels_dtype(monkeypatch):
    """Under CUDA's autocast SDPA returns bf16 for float32 queries (rotary embeddings promote them); the output
    takes SDPA's dtype instead of failing to copy bf16 into a float32 buffer (seen on an H200, 2026-12-04)."""
    sdpa = sa.F.scaled_dot_product_attention
    monkeypatch.setattr(sa.F, "scaled_dot_product_attention", lambda *a, **k: sdpa(*a, **k).bfloat16())
    segments, pos, dense = layout("shared")
    q, k, v = inputs(segments.length)
    out = sa._blockwise(q, k, v, segments, sink=None, scaling=0.3, dropout=0.0, window=None, softcap=None)
    assert out.dtype == torch.bfloat16
    expected = reference(q, k, v, dense, pos, scaling=0.3)
    assert torch.allclose(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_what_the_layout_cannot_follow_raises():
    segments, _, _ = layout("shared")
    q, k, v = inputs(segments.length)
    mask = SegmentMask(segments, None)
    bidirectional = torch.nn.Module()
    bidirectional.is_causal = False
    for call, match in [
        (lambda: segment_attention_forward(torch.nn.Module(), q, k, v, None), "attention_mask must be"),
        (lambda: segment_attention_forward(bidirectional, q, k, v, mask), "bidirectional"),
        (lambda: segment_attention_forward(torch.nn.Module(), q, k, v, mask, is_causal=False), "bidirectional"),
        (lambda: segment_attention_forward(torch.nn.Module(), q, k, v, mask, position_bias=q), "position_bias"),
        (lambda: segment_attention_forward(torch.nn.Module(), q, k, v, SegmentMask(segments, 3), sliding_window=4),
         "sliding_window 4 differs"),
        (lambda: segment_attention_forward(torch.nn.Module(), q, k, v, mask, s_aux=q[0, :, 0, 0],
                                           sinks=q[0, :, 0, 0]), "both s_aux and sinks"),
        (lambda: segment_attention_forward(torch.nn.Module(), q[:, :, 1:], k, v, mask), "one row"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            call()


@pytest.mark.parametrize("mask_function, local_size, ok", [
    (masking_utils.causal_mask_function, None, True),
    (masking_utils.sliding_window_causal_mask_function(4), 4, True),
    (masking_utils.sliding_window_causal_mask_function(1), 1, True),
    (masking_utils.sliding_window_causal_mask_function(4), None, False),
    (masking_utils.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), 4, False),
    (lambda *args: torch.tensor(True), None, False),
], ids=["causal", "sliding", "sliding-1", "undeclared-window", "chunked", "bidirectional"])
def test_the_mask_function_accepts_only_causal_masks(mask_function, local_size, ok):
    segments, _, _ = layout("packed")
    token = sa._SEGMENTS.set(segments)
    try:
        def ask():
            return segment_mask(1, segments.length, segments.length, mask_function=mask_function,
                                local_size=local_size)

        if ok:
            mask = ask()
            assert mask.segments is segments and mask.window == local_size
        else:
            with pytest.raises(ValueError, match="not causal"):
                ask()
    finally:
        sa._SEGMENTS.reset(token)


def test_a_bidirectional_model_fails_the_self_check():
    gemma3 = next(a for a in ARCHITECTURES if a.name == "Gemma 3 text (default)")
    ok, reason = packing_check(build(arch_config(gemma3, use_bidirectional_attention=True)))
    assert not ok and "not causal" in reason


def test_the_switch_covers_sub_configs_and_restores_them_on_an_exception():
    model = build(next(a for a in ARCHITECTURES if a.name == "Gemma 4 (multimodal)"))
    before = [(c, c._attn_implementation) for c in sa._configs(model)]
    assert len(before) > 1 and all(impl != NAME for _, impl in before)
    with pytest.raises(RuntimeError, match="inside"):
        with segment_attention(model):
            assert all(c._attn_implementation == NAME for c, _ in before)
            with segment_attention(model):
                pass
            assert model.config.get_text_config()._attn_implementation == NAME
            raise RuntimeError("inside")
    assert [(c, c._attn_implementation) for c, _ in before] == before
