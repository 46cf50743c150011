"""selpo.lean_body: the lean SwiGLU MLP and RMSNorm against eager float64 math (values and every gradient, odd
sizes, no rows, one row), under bf16 autocast, and swapped into a tiny Llama: the same loss and gradients, fewer
saved bytes, the modules' own forwards back afterwards, and modules that compute something else left alone; and
every architecture of the head conformance suite trained with it keeps its own log-probs and gradients. The lean
LoRA MLP (selpo.lean_lora) against PEFT's forward: values and the gradients of x and every adapter factor in
float64 and float32 (odd sizes, one row, no rows, some projections adapted), under bf16 autocast, with the adapter
disabled (the base MLP), merged, or with dropout (PEFT's forward kept)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_modules_that_compute_something_else_keep_their_forward(dtype):
    """Also in a half dtype, where lean_body's check allows a few roundings."""
    model = nn.Sequential(GemmaStyleRMSNorm(6), ScaledMLP(6)).to(dtype)
    x = torch.randn(2, 6).to(dtype)
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


# ---- LoRA-adapted MLPs (selpo.lean_lora): PEFT's layers on the projections ----

class SwiGLU(nn.Module):
    """A Llama-style MLP (what lean_body looks for), on its own."""

    def __init__(self, width, inner):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(width, inner, bias=False), nn.Linear(width, inner, bias=False)
        self.down_proj, self.act_fn = nn.Linear(inner, width, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


ALL = ("gate_proj", "up_proj", "down_proj")


def _with_lora(module, targets, *, dtype, seed, rank, dropout):
    """``module`` with PEFT's LoRA layers on ``targets`` (rank ``rank``, alpha 5), every weight random (PEFT starts B
    at 0), the base frozen; and its PeftModel."""
    peft = get_peft_model(module, LoraConfig(r=rank, lora_alpha=5, lora_dropout=dropout, target_modules=list(targets)))
    module.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=dtype) / param.shape[-1] ** 0.5)
    return module, peft


def _lora_mlp(targets=ALL, *, dtype=torch.float64, seed=0, width=7, inner=13, rank=3, dropout=0.0):
    """A SwiGLU MLP with LoRA on ``targets`` (``_with_lora``; rank 3: scale 5/3); and its PeftModel."""
    return _with_lora(SwiGLU(width, inner), targets, dtype=dtype, seed=seed, rank=rank, dropout=dropout)


def _mlp_grads(mlp, x, grad_out, forward=None):
    """The output of ``forward`` (the module's, by default) on ``x`` and the gradients of x and of every weight that
    requires one (None for those that got none)."""
    mlp.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = (forward or mlp)(x)
    out.backward(grad_out)
    return out.detach(), {"x": x.grad, **{n: p.grad for n, p in mlp.named_parameters() if p.requires_grad}}


def _lean(out):
    assert type(out.grad_fn).__name__ == "_LoRASwiGLUBackward", out.grad_fn  # not PEFT's forward
    return out


def _lean_lora(mlp, x, grad_out):
    """The lean LoRA MLP on ``x``, through lean_body's swap."""
    with lean_body(mlp) as swapped:
        assert swapped == [""]
        return _mlp_grads(mlp, x, grad_out, lambda t: _lean(mlp(t)))


@pytest.mark.parametrize("targets", [ALL, ("gate_proj",), ("up_proj", "down_proj")], ids="+".join)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 7), (2, 1, 7), (0, 7)])
def test_lean_lora_mlp_matches_peft_float64(shape, targets):
    """Output and the gradients of x and of every adapter's A and B equal PEFT's forward's; the frozen base weights
    get no gradient."""
    seed = hash((shape, targets)) % 2 ** 31  # fresh inputs and weights per case
    mlp, _ = _lora_mlp(targets, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64)
    want, want_grads = _mlp_grads(mlp, x, grad_out)
    got, got_grads = _lean_lora(mlp, x, grad_out)
    assert sorted(got_grads) == sorted(["x"] + [f"{t}.lora_{m}.default.weight" for t in targets for m in "AB"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-12, atol=1e-12, msg=name)
        assert shape[0] == 0 or grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in mlp.named_parameters() if "lora_" not in n)


def test_lean_lora_mlp_trains_a_base_weight_that_requires_grad():
    """Not LoRA's case (its base is frozen), but a base weight that requires grad gets PEFT's gradient."""
    mlp, _ = _lora_mlp(("gate_proj", "down_proj"), seed=11, width=6, inner=9)
    mlp.requires_grad_(True)
    generator = torch.Generator().manual_seed(12)
    x, grad_out = torch.randn(4, 6, generator=generator, dtype=torch.float64), torch.randn(4, 6, generator=generator,
                                                                                            dtype=torch.float64)
    want, want_grads = _mlp_grads(mlp, x, grad_out)
    got, got_grads = _lean_lora(mlp, x, grad_out)
    assert len(got_grads) == 1 + 3 + 2 * 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-12, atol=1e-12, msg=name)


def test_lean_lora_mlp_matches_peft_float32():
    mlp, _ = _lora_mlp(dtype=torch.float32, seed=21, width=33, inner=70, rank=5)
    generator = torch.Generator().manual_seed(22)
    x, grad_out = torch.randn(3, 11, 33, generator=generator), torch.randn(3, 11, 33, generator=generator)
    want, want_grads = _mlp_grads(mlp, x, grad_out)
    got, got_grads = _lean_lora(mlp, x, grad_out)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 7
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)


def test_lean_lora_mlp_with_the_adapter_disabled_is_the_base_mlp():
    """The reference pass (PEFT's disable_adapter) of a lean LoRA MLP gives the base MLP's output and x-gradient, and
    no adapter gradient; enabled again, the adapter's."""
    mlp, peft = _lora_mlp(seed=41)
    base = SwiGLU(7, 13).to(torch.float64)
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in mlp.state_dict().items() if "lora_" not in k})
    generator = torch.Generator().manual_seed(42)
    x, grad_out = torch.randn(5, 7, generator=generator, dtype=torch.float64), torch.randn(5, 7, generator=generator,
                                                                                            dtype=torch.float64)
    want, want_grads = _mlp_grads(base.requires_grad_(False), x, grad_out)
    adapted, adapted_grads = _mlp_grads(mlp, x, grad_out)
    with lean_body(mlp) as swapped:
        assert swapped == [""]
        with peft.disable_adapter():
            off, off_grads = _mlp_grads(mlp, x, grad_out)
        on, on_grads = _mlp_grads(mlp, x, grad_out)
    torch.testing.assert_close(off, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(off_grads["x"], want_grads["x"], rtol=1e-12, atol=1e-12)
    assert all(g is None for n, g in off_grads.items() if n != "x")
    assert (on - off).abs().max() > 1e-3
    torch.testing.assert_close(on, adapted, rtol=1e-12, atol=1e-12)
    for name, grad in adapted_grads.items():
        torch.testing.assert_close(on_grads[name], grad, rtol=1e-12, atol=1e-12, msg=name)


def test_a_merged_adapter_runs_peft_forward():
    """Merged into the base weights (PEFT's merge_adapter) while swapped, the MLP runs its own forward again (the
    lean one would add the adapter twice), and the lean one once unmerged."""
    mlp, peft = _lora_mlp(seed=51)
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(52), dtype=torch.float64)
    with torch.no_grad():
        want = mlp(x)
        with lean_body(mlp) as swapped:
            assert swapped == [""]
            peft.merge_adapter()
            merged = mlp(x)
            peft.unmerge_adapter()
            unmerged = mlp(x)
    torch.testing.assert_close(merged, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(unmerged, want, rtol=1e-10, atol=1e-10)


# ---- a lone LoRA-adapted projection (selpo.lean_lora.lora_linear): the attention's, say ----

class Attention(nn.Module):
    """A module with one projection, as an attention's q_proj."""

    def __init__(self, width, out):
        super().__init__()
        self.q_proj = nn.Linear(width, out, bias=False)

    def forward(self, x):
        return self.q_proj(x)


def _lora_projection(*, dtype=torch.float64, seed=0, width=7, out=5, rank=3, dropout=0.0):
    """``Attention`` with LoRA on q_proj (``_with_lora``); and its PeftModel."""
    return _with_lora(Attention(width, out), ["q_proj"], dtype=dtype, seed=seed, rank=rank, dropout=dropout)


def _lean_projection(module, x, grad_out):
    """The lean projection on ``x``, through lean_body's swap: the adapter's part added by the base GEMM."""
    def lean(t):
        out = module(t)
        assert "AddmmBackward0" in {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None} | \
            {type(out.grad_fn).__name__}, out.grad_fn  # not PEFT's forward (a sum after the GEMMs)
        return out

    with lean_body(module) as swapped:
        assert swapped == ["q_proj"]
        return _mlp_grads(module, x, grad_out, lean)


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 7), (2, 1, 7), (0, 7)])
def test_lean_lora_projection_matches_peft_float64(shape):
    """Output and the gradients of x, A and B equal PEFT's forward's; the frozen base weight gets no gradient."""
    seed = hash(shape) % 2 ** 31
    module, _ = _lora_projection(seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(*shape[:-1], 5, generator=generator, dtype=torch.float64)
    want, want_grads = _mlp_grads(module, x, grad_out)
    got, got_grads = _lean_projection(module, x, grad_out)
    assert sorted(got_grads) == ["q_proj.lora_A.default.weight", "q_proj.lora_B.default.weight", "x"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-12, atol=1e-12, msg=name)
        assert shape[0] == 0 or grad.abs().sum() > 0, name
    assert module.q_proj.base_layer.weight.grad is None


@pytest.mark.parametrize("kind", ["mlp", "projection"])
def test_lean_lora_under_bf16_autocast(kind):
    """Under autocast the lean LoRA MLP and projection run PEFT's GEMMs in bf16, the base GEMM accumulating onto the
    adapter's part (one rounding fewer): the output is on average as close to the float64 module's as PEFT's (its
    largest error is one bf16 ulp of some element, in either); the gradients come back in float32, within bf16
    rounding of PEFT's."""
    generator = torch.Generator().manual_seed(32)
    if kind == "mlp":
        module, _ = _lora_mlp(dtype=torch.float32, seed=31, width=16, inner=24, rank=4)
        x, grad_out = torch.randn(4, 9, 16, generator=generator), torch.randn(4, 9, 16, generator=generator)
    else:
        module, _ = _lora_projection(dtype=torch.float32, seed=71, width=40, out=24, rank=8)
        x, grad_out = torch.randn(3, 10, 40, generator=generator), torch.randn(3, 10, 24, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _mlp_grads(module, x, grad_out)
        got, got_grads = (_lean_lora if kind == "mlp" else _lean_projection)(module, x, grad_out)
    exact = copy.deepcopy(module).to(torch.float64)(x.double()).detach()
    assert got.dtype == want.dtype == torch.bfloat16 and not torch.equal(got, want)  # not PEFT's forward
    assert (got.double() - exact).abs().mean() <= 1.1 * (want.double() - exact).abs().mean()
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == (7 if kind == "mlp" else 3)
    for name, grad in want_grads.items():
        assert got_grads[name].dtype == grad.dtype == torch.float32, name
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=2e-2 * float(grad.abs().max()), msg=name)


def test_lean_lora_projection_with_the_adapter_disabled_or_per_row_adapters():
    """Disabled (the reference pass): the base GEMM alone, no adapter gradient. Called with PEFT's per-row
    ``adapter_names``: PEFT's own forward. Merged: PEFT's forward, the adapter not added twice."""
    module, peft = _lora_projection(seed=81)
    generator = torch.Generator().manual_seed(82)
    x, grad_out = torch.randn(4, 7, generator=generator, dtype=torch.float64), torch.randn(4, 5, generator=generator,
                                                                                            dtype=torch.float64)
    adapted, _ = _mlp_grads(module, x, grad_out)
    base = x @ module.q_proj.base_layer.weight.T
    with lean_body(module) as swapped:
        assert swapped == ["q_proj"]
        with peft.disable_adapter():
            off, off_grads = _mlp_grads(module, x, grad_out)
        per_row = module.q_proj(x, adapter_names=["default", "__base__", "default", "__base__"])
        assert type(per_row.grad_fn).__name__ != "ViewBackward0"  # PEFT's forward, not the lean one
        with torch.no_grad():
            peft.merge_adapter()
            merged = module(x)
            peft.unmerge_adapter()
    torch.testing.assert_close(off, base.detach(), rtol=1e-12, atol=1e-12)
    assert sorted(n for n, g in off_grads.items() if g is not None) == ["x"]
    torch.testing.assert_close(per_row[0::2], adapted[0::2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_row[1::2], base[1::2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged, adapted, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_modules_are_swapped(dtype):
    """A model in bf16 or fp16 weights: the plain MLP, the LoRA MLP and the lone LoRA projection pass lean_body's
    check (the LoRA ones round in another order than PEFT's), and give PEFT's output within a few roundings."""
    plain = SwiGLU(64, 96).to(dtype)
    mlp, _ = _lora_mlp(dtype=dtype, seed=3, width=64, inner=96, rank=8)
    projection, _ = _lora_projection(dtype=dtype, seed=3, width=64, out=48, rank=8)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        want = [module(x) for module in (plain, mlp, projection)]
        with lean_body(plain) as a, lean_body(mlp) as b, lean_body(projection) as c:
            assert (a, b, c) == ([""], [""], ["q_proj"])
            got = [module(x) for module in (plain, mlp, projection)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=4 * torch.finfo(dtype).eps * float(w.abs().max()))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_adapter_with_dropout_keeps_peft_forward(training):
    """Whatever mode it is swapped in (in eval mode dropout is the identity, and lean_body's check would pass)."""
    mlp, _ = _lora_mlp(seed=61, dropout=0.1)
    mlp.train(training)
    with lean_body(mlp) as swapped:
        assert swapped == []
