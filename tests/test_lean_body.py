"""selpo.lean_body: the lean SwiGLU MLP and RMSNorm against eager float64 math (values and every gradient, odd
sizes, no rows, one row), under bf16 autocast, and swapped into a tiny Llama: the same loss and gradients, fewer
saved bytes, the modules' own forwards back afterwards, and modules that compute something else left alone; and
every architecture of the head conformance suite trained with it keeps its own log-probs and gradients."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selpo.lean_body import lean_body, rms_norm, swiglu_mlp
from selpo.models import load_causal_lm
from selpo.testing import tiny_model_dir

sys.path.insert(0, str(Path(__file__).parent))
from test_head_conformance import ARCHITECTURES, GRAD_RTOL, LOGP_TOL, batch_ids, build, gradients, model_logps, slug  # noqa: E402


def _eager_mlp(x, gate_w, up_w, down_w):
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def _eager_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _value_and_grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("shape", [(0, 7), (1, 7), (3, 5, 7), (2, 1, 13)])
def test_swiglu_mlp_matches_eager_float64(shape):
    torch.manual_seed(0)
    width, inner = shape[-1], 11
    inputs = [torch.randn(shape, dtype=torch.float64), torch.randn(inner, width, dtype=torch.float64),
              torch.randn(inner, width, dtype=torch.float64), torch.randn(width, inner, dtype=torch.float64)]
    grad_out = torch.randn(shape, dtype=torch.float64)
    got, got_grads = _value_and_grads(swiglu_mlp, inputs, grad_out)
    want, want_grads = _value_and_grads(_eager_mlp, inputs, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(0, 6), (1, 6), (4, 3, 6), (5, 17)])
def test_rms_norm_matches_eager_float64(shape):
    torch.manual_seed(1)
    inputs = [torch.randn(shape, dtype=torch.float64) * 3, torch.randn(shape[-1], dtype=torch.float64)]
    grad_out = torch.randn(shape, dtype=torch.float64)
    got, got_grads = _value_and_grads(lambda x, w: rms_norm(x, w, 1e-5), inputs, grad_out)
    want, want_grads = _value_and_grads(lambda x, w: _eager_norm(x, w, 1e-5), inputs, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_bf16_autocast_gives_eager_dtypes_and_values():
    """Under autocast the GEMMs run in bf16 as nn.Linear's would; gradients come back in float32."""
    torch.manual_seed(2)
    inputs = [torch.randn(4, 9, 16), torch.randn(24, 16) / 4, torch.randn(24, 16) / 4, torch.randn(16, 24) / 5]
    grad_out = torch.randn(4, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = _value_and_grads(swiglu_mlp, inputs, grad_out)
        want, want_grads = _value_and_grads(_eager_mlp, inputs, grad_out)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same bf16 ops in the same order
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=2e-2 * float(w.abs().max()))


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids).logits.float().log_softmax(-1)[..., 0].sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_bytes(model, ids):
    """Bytes of the distinct non-parameter tensors autograd saves for the backward of one forward."""
    seen, total = set(), [0]

    def pack(t):
        if not isinstance(t, nn.Parameter) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return total[0]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    model, _ = load_causal_lm(tiny_model_dir(tmp_path_factory.mktemp("lean")))
    return model.train()


def test_a_llama_runs_lean_with_its_own_loss_and_gradients(tiny_llama):
    ids = torch.randint(0, 50, (3, 13), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(tiny_llama, ids)
    eager_bytes = _saved_bytes(tiny_llama, ids)
    with lean_body(tiny_llama) as swapped:
        lean_loss, lean_grads = _loss_and_grads(tiny_llama, ids)
        lean_bytes = _saved_bytes(tiny_llama, ids)
    layers = tiny_llama.config.num_hidden_layers
    assert sorted(swapped) == sorted([f"model.layers.{i}.{m}" for i in range(layers)
                                      for m in ("mlp", "input_layernorm", "post_attention_layernorm")]
                                     + ["model.norm"])
    torch.testing.assert_close(lean_loss, loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))
    assert lean_bytes < 0.75 * eager_bytes
    assert not [n for n, m in tiny_llama.named_modules() if "forward" in m.__dict__]


class GemmaStyleRMSNorm(nn.Module):
    """Named like an RMSNorm and built like one, but scales by 1 + weight (Gemma's)."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))
        self.eps = 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class ScaledMLP(nn.Module):
    """A SwiGLU MLP's parts with a different forward."""

    def __init__(self, width):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(width, 8, bias=False), nn.Linear(width, 8, bias=False)
        self.down_proj, self.act_fn = nn.Linear(8, width, bias=False), nn.SiLU()

    def forward(self, x):
        return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_modules_that_compute_something_else_keep_their_forward():
    model = nn.Sequential(GemmaStyleRMSNorm(6), ScaledMLP(6))
    x = torch.randn(2, 6)
    want = model(x)
    with lean_body(model) as swapped:
        assert swapped == []
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_mlp_false_swaps_the_norms_only(tiny_llama):
    with lean_body(tiny_llama, mlp=False) as swapped:
        assert swapped and all(name.endswith("norm") for name in swapped)


def test_the_forwards_come_back_when_the_block_raises(tiny_llama):
    with pytest.raises(RuntimeError, match="stop"):
        with lean_body(tiny_llama) as swapped:
            assert swapped
            raise RuntimeError("stop")
    assert not [n for n, m in tiny_llama.named_modules() if "forward" in m.__dict__]



SWAPPED_IN = {"llama", "mistral", "qwen2", "qwen3", "olmo2", "granite"}  # SwiGLU MLPs, plain RMSNorms: lean_body acts


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=slug)
def test_every_architecture_keeps_its_log_probs_and_gradients(arch):
    """On each architecture of the head conformance suite, the model's own log-probs and gradients are the same
    with and without the lean body; what it swaps is whatever passed its check."""
    model = build(arch)  # in eval mode: dropout would make two forwards differ
    ids = batch_ids()
    w = torch.randn(ids.shape[0] * (ids.shape[1] - 1), generator=torch.Generator().manual_seed(2))
    expected = model_logps(model, ids)
    expected_grads = gradients(model, expected, w)
    with lean_body(model) as swapped:
        got = model_logps(model, ids)
        got_grads = gradients(model, got, w)
    if arch.model_type in SWAPPED_IN:
        assert any(name.endswith("mlp") for name in swapped) and any(name.endswith("norm") for name in swapped)
    assert float((got - expected).detach().abs().max()) <= LOGP_TOL
    scale = max(float(g.abs().max()) for g in expected_grads)
    assert max(float((a - b).abs().max()) for a, b in zip(got_grads, expected_grads)) <= GRAD_RTOL * scale


def test_a_loaded_models_lean_forwards_survive_train_and_eval(tiny_llama):
    """transformers 5 with its `kernels` package re-kernelizes a model on every train()/eval(), resetting the
    forwards of the layers that have a hub kernel; selpo loads models with use_kernels=False (models.LOAD_OPTIONS)."""
    model = tiny_llama
    with lean_body(model) as names:
        model.eval()
        model.train()
        assert names and all("forward" in model.get_submodule(name).__dict__ for name in names)
    assert not getattr(model, "use_kernels", False)
