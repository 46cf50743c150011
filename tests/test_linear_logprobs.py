"""linear_logprobs on every backend against the naive reference in float64: values, gradients, edge cases."""

import pytest
import torch
from conftest import BACKENDS
from helpers import TOL

from selpo.kernels import ledger, linear_logprobs
from selpo.kernels.streaming import passes_torch, plan

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, D, V): N = 0 and 1, D not a power of two, V not a multiple of the vocabulary block (128).
SIZES = [(0, 8, 5), (1, 7, 129), (37, 45, 300)]


def make_inputs(n, d, v, dtype, bias=False, scale=0.4):
    hidden = torch.randn(n, d).to(dtype)
    weight = (torch.randn(v, d) * scale).to(dtype)
    b = (torch.randn(v) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,))
    if n > 3:
        targets[::4] = -100
    return hidden, weight, b, targets


def run(hidden, weight, bias, targets, grad, backend, **kw):
    """(logp, grad_hidden, grad_weight, grad_bias) in float64, for upstream gradient ``grad``."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logp = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], backend=backend, **kw)
    (logp.double() * grad).sum().backward()
    return [logp.detach().double()] + [t.grad.double() if t is not None else None for t in leaves]


def reference(hidden, weight, bias, targets, grad, **kw):
    """The naive path in float64 on the same (rounded) inputs."""
    as64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    return run(as64[0], as64[1], as64[2], targets, grad, "naive", **kw)


def assert_close(got, want, dtype, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    tol = TOL[dtype]
    # Gradients of weight sum over rows: compare relative to their scale.
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("options", [{}, {"bias": True, "temperature": 0.7}, {"softcap": 3.0, "temperature": 1.3}])
def test_matches_reference(backend, dtype, size, options):
    options = dict(options)
    hidden, weight, bias, targets = make_inputs(*size, dtype, bias=options.pop("bias", False))
    grad = torch.randn(size[0], dtype=torch.float64)
    if size[0] > 2:
        grad[1::3] = 0.0  # rows without gradient are skipped by the backward
    got = run(hidden, weight, bias, targets, grad, backend, **options)
    want = reference(hidden, weight, bias, targets, grad, **options)
    assert got[0].dtype == torch.float64 and linear_logprobs(hidden, weight, targets, bias=bias, backend=backend,
                                                            **options).dtype == torch.float32
    for name, g, w in zip(("logp", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        if w is not None:
            assert_close(g, w, dtype, name)
    ignored = targets == -100
    assert torch.all(got[0][ignored] == 0) and torch.all(got[1][ignored] == 0)
    if size[0] > 2:
        assert torch.all(got[1][1::3] == 0), "rows with zero upstream gradient must get exactly zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, {"bias": True, "softcap": 2.0, "temperature": 0.8}])
@pytest.mark.parametrize("subset", [True, False], ids=["row-subset", "all-rows"])
def test_many_chunks_and_slices(backend, dtype, options, subset, monkeypatch):
    """A small logits buffer: the forward takes two row chunks of three vocabulary slices (the last partial);
    the backward groups its rows (dL/dweight added over the groups) and slices the vocabulary (dL/dhidden
    summed over the slices). With ignored targets the rows are gathered; without, hidden is read in place."""
    monkeypatch.setattr(plan, "BUFFER_BYTES", {"cpu": 8192 * 4, "cuda": 8192 * 4})
    monkeypatch.setattr(passes_torch, "BLOCK_BYTES", 5000)  # the CPU passes walk each tile in blocks of rows
    options = dict(options)
    hidden, weight, bias, targets = make_inputs(400, 20, 300, dtype, bias=options.pop("bias", False))
    if not subset:
        targets = torch.randint(0, 300, (400,))
    grad = torch.randn(400, dtype=torch.float64)
    with ledger.counting() as book:
        got = run(hidden, weight, bias, targets, grad, backend, **options)
    assert len(book.gemms()) > 12 and any(e.extra_bytes for e in book.gemms())
    want = reference(hidden, weight, bias, targets, grad, **options)
    for name, g, w in zip(("logp", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        if w is not None:
            assert_close(g, w, dtype, name)


@pytest.mark.parametrize("options", [{}, {"temperature": 0.6, "softcap": 2.5}])
def test_gradcheck_torch_path(options):
    hidden, weight, bias, targets = make_inputs(6, 5, 11, torch.float64, bias=True)
    targets[2] = -100
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_logprobs(h, w, targets, bias=b, backend="torch", **options), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_gives_nan(backend, bad):
    hidden, weight, _, targets = make_inputs(5, 6, 40, torch.float32)
    targets[:] = 3
    hidden[2, 1] = bad
    logp = linear_logprobs(hidden, weight, targets, backend=backend)
    assert torch.isnan(logp[2]), f"a row with {bad} in its hidden state must give nan, got {logp[2]}"
    assert torch.isfinite(logp[[0, 1, 3, 4]]).all()


def test_logprobs_are_normalized():
    """Summed over all targets, the probabilities of one row are 1: catches a wrong log-sum-exp."""
    hidden, weight, _, _ = make_inputs(1, 9, 77, torch.float32)
    v = weight.shape[0]
    logp = linear_logprobs(hidden.expand(v, -1), weight, torch.arange(v), backend="torch")
    assert abs(logp.double().exp().sum().item() - 1.0) < 1e-5


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden": torch.zeros(3, 4, 1)}, "hidden must have 2"),
    ({"weight": torch.zeros(5, 3)}, "weight must have shape"),
    ({"weight": torch.zeros(5, 4, dtype=torch.float16)}, "weight has dtype"),
    ({"targets": torch.tensor([0, 1, 5])}, "targets must lie in"),
    ({"targets": torch.tensor([0, -1, 2])}, "targets must lie in"),
    ({"targets": torch.tensor([0, 1])}, "targets must have shape"),
    ({"targets": torch.tensor([0.0, 1.0, 2.0])}, "targets must be int64"),
    ({"bias": torch.zeros(4)}, "bias must have shape"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"softcap": -1.0}, "softcap must be > 0"),
    ({"backend": "cuda"}, "backend must be one of"),
    ({"hidden": torch.zeros(3, 4, dtype=torch.int32)}, "hidden must be float32"),
])
def test_bad_input(kwargs, match):
    args = {"hidden": torch.zeros(3, 4), "weight": torch.zeros(5, 4), "targets": torch.tensor([0, 1, 4])}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_triton_rejects_float64():
    hidden, weight, _, targets = make_inputs(2, 3, 4, torch.float64)
    with pytest.raises(TypeError, match="hidden: the triton backend"):
        linear_logprobs(hidden, weight, targets, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_recomputes_only_rows_with_gradient(backend):
    """With a 30% token mask in the loss, the backward's three GEMMs cover 30% of the rows: its cost scales."""
    hidden, weight, _, targets = make_inputs(40, 6, 30, torch.float32)
    targets[:] = 1
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp = linear_logprobs(h, w, targets, backend=backend)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[::3] = True  # 14 of 40 rows
    with ledger.counting() as book:
        (logp * mask).sum().backward()
    assert [e.name for e in book.gemms()] == ["logits", "grad_weight", "grad_hidden"]
    assert book.flops == 3 * 2 * 14 * 30 * 6
    assert torch.all(h.grad[~mask] == 0) and torch.all(h.grad[mask].abs().sum(1) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_targets_and_list_targets(backend):
    hidden, weight, _, _ = make_inputs(6, 5, 20, torch.float32)
    both = torch.randint(0, 20, (12,))
    strided = both[::2]
    got = linear_logprobs(hidden, weight, strided, backend=backend)
    want = linear_logprobs(hidden, weight, strided.contiguous(), backend="naive")
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(TypeError, match="targets must be a torch.Tensor"):
        linear_logprobs(hidden, weight, [0, 1, 2, 3, 4, 5], backend=backend)
