"""logprobs_from_logits against float64 log_softmax written here, on every backend, forward and gradient."""

import pytest
import torch

from selpo.kernels.logits_logprobs import logprobs_from_logits, torch_ops, triton_kernels

# Triton's interpreter runs on numpy, which warns on log(0) (the lse of an ignored row, discarded) and inf - inf.
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

BACKENDS = ["naive", "torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100
BLOCK = triton_kernels.MAX_BLOCK_V
# (N, V): no row, a one-token vocabulary, V not a multiple of any block, several chunks of rows on the torch
# path, several Triton blocks per row.
SHAPES = [(0, 5), (1, 1), (1, 37), (21, 100), (3, 2 * BLOCK + 37)]

# The logits are the inputs, widened exactly to fp32: only fp32 arithmetic separates every dtype from the
# float64 reference, so the forward is held far tighter than helpers.TOL (which allows for the GEMM rounding
# of linear_logprobs). The gradient is rounded once to the logits' dtype: one ulp of relative error.
FWD_ATOL = 2e-5
GRAD_ATOL = 1e-5


def grad_rtol(dtype):
    return max(torch.finfo(dtype).eps, 1e-5)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """The torch path walks over several chunks of rows even at test sizes (8 rows per chunk)."""
    monkeypatch.setattr(torch_ops, "CHUNK_ELEMENTS", 1)


def make_inputs(n, v, dtype):
    """Logits, targets with about a quarter ignored, and an upstream gradient with about a quarter zeros."""
    logits = (torch.randn(n, v) * 3).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < 0.25] = IGNORE
    grad_out = torch.randn(n)
    grad_out[torch.rand(n) < 0.25] = 0.0
    return logits, targets, grad_out


def reference(logits, targets, grad_out, temperature=1.0):
    """float64 ``log_softmax(logits / T)[targets]`` (0 where ignored) and its gradient by autograd."""
    x = logits.detach().double().requires_grad_()
    keep = targets != IGNORE
    picked = torch.log_softmax(x[keep] / temperature, dim=-1).gather(1, targets[keep].long()[:, None]).squeeze(1)
    (grad,) = torch.autograd.grad(picked, x, grad_out[keep].double())
    out = torch.zeros(logits.shape[0], dtype=torch.float64)
    out[keep] = picked.detach()
    return out, grad


def run(logits, targets, grad_out, **kwargs):
    """(log-probs, gradient w.r.t. logits) of the op."""
    x = logits.clone().requires_grad_()
    out = logprobs_from_logits(x, targets, **kwargs)
    (grad,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    return out, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, v", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(backend, dtype, n, v, temperature):
    logits, targets, grad_out = make_inputs(n, v, dtype)
    out, grad = run(logits, targets, grad_out, temperature=temperature, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert grad.dtype == dtype and grad.shape == (n, v)
    want_out, want_grad = reference(logits, targets, grad_out, temperature)
    torch.testing.assert_close(out.double(), want_out, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(grad.double(), want_grad, atol=GRAD_ATOL, rtol=grad_rtol(dtype))
    ignored = targets == IGNORE
    assert (out[ignored] == 0).all()
    assert (grad[ignored | (grad_out == 0)] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_and_strided_targets(backend):
    logits, targets, grad_out = make_inputs(11, 37, torch.float32)
    strided = torch.stack([targets, torch.zeros_like(targets)], dim=1).to(torch.int32).view(-1)[::2]
    assert not strided.is_contiguous()
    out, grad = run(logits, strided, grad_out, backend=backend)
    want_out, want_grad = reference(logits, targets, grad_out)
    torch.testing.assert_close(out.double(), want_out, atol=FWD_ATOL, rtol=0)
    torch.testing.assert_close(grad.double(), want_grad, atol=GRAD_ATOL, rtol=grad_rtol(torch.float32))


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_float64(backend):
    logits, targets, grad_out = make_inputs(13, 29, torch.float64)
    out, grad = run(logits, targets, grad_out, temperature=1.3, backend=backend)
    assert out.dtype == torch.float64 and grad.dtype == torch.float64
    want_out, want_grad = reference(logits, targets, grad_out, 1.3)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=0)


def test_gradcheck_torch():
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 4, IGNORE, 2, 2, IGNORE, 1])
    assert torch.autograd.gradcheck(
        lambda x: logprobs_from_logits(x, targets, temperature=0.7, backend="torch"), (logits,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_rows(backend, dtype):
    """nan, +inf or an all -inf row gives nan (and a nan gradient); -inf elsewhere is a masked token, as in
    log_softmax; an ignored row gives 0 whatever it holds."""
    logits = (torch.randn(8, 37) * 3).to(dtype)
    targets = torch.randint(0, 37, (8,))
    logits[0, 5] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[3, :10] = float("-inf")
    targets[3] = 4  # a masked target: log-prob -inf
    logits[4, 10:] = float("-inf")
    targets[4] = 6
    logits[5, 1] = float("nan")
    targets[5] = IGNORE
    grad_out = torch.randn(8)
    out, grad = run(logits, targets, grad_out, temperature=0.7, backend=backend)
    want_out, want_grad = reference(logits, targets, grad_out, 0.7)
    assert out[:3].isnan().all() and grad[:3].isnan().all()
    assert out[3] == float("-inf") and out[4].isfinite() and grad[3:].isfinite().all()
    assert out[5] == 0 and (grad[5] == 0).all()
    torch.testing.assert_close(out.double(), want_out, atol=FWD_ATOL, rtol=0, equal_nan=True)
    torch.testing.assert_close(grad.double(), want_grad, atol=GRAD_ATOL, rtol=grad_rtol(dtype), equal_nan=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
def test_rows_without_gradient_are_not_read(backend, inplace):
    """A row with zero upstream gradient gets exactly 0 without being read: a nan in it does not leak.
    (The naive backend is plain autograd, where 0 * nan = nan.)"""
    logits, targets, _ = make_inputs(6, 37, torch.bfloat16)
    targets[:] = 3
    logits[1, 7] = float("nan")
    grad_out = torch.tensor([0.5, 0.0, -1.0, 0.0, 2.0, 1.0])
    _, grad = run(logits, targets, grad_out, backend=backend, inplace_backward=inplace)
    assert (grad[1] == 0).all() and (grad[3] == 0).all()
    keep = torch.tensor([0, 2, 4, 5])
    _, want_grad = reference(logits[keep], targets[keep], grad_out[keep])
    torch.testing.assert_close(grad[keep].double(), want_grad, atol=GRAD_ATOL, rtol=grad_rtol(torch.bfloat16))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_reuses_the_logits(backend, dtype):
    logits, targets, grad_out = make_inputs(10, BLOCK + 5, dtype)
    want_out, want_grad = run(logits, targets, grad_out, temperature=0.7, backend=backend)
    x = logits.clone().requires_grad_()
    out = logprobs_from_logits(x, targets, temperature=0.7, inplace_backward=True, backend=backend)
    assert torch.equal(out, want_out)
    (grad,) = torch.autograd.grad(out, x, grad_out, retain_graph=True)
    assert grad.data_ptr() == x.data_ptr()
    assert torch.equal(grad, want_grad)
    assert torch.equal(x.detach(), want_grad)  # the caller's logits now hold the gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, x, grad_out)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inplace_backward_on_strided_logits_overwrites_a_copy(backend):
    logits, targets, grad_out = make_inputs(9, 37, torch.float32)
    leaf = logits.T.contiguous().requires_grad_()
    kept = leaf.detach().clone()
    out = logprobs_from_logits(leaf.T, targets, inplace_backward=True, backend=backend)
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    assert torch.equal(leaf.detach(), kept)
    _, want_grad = reference(logits, targets, grad_out)
    torch.testing.assert_close(grad.T.double(), want_grad, atol=GRAD_ATOL, rtol=grad_rtol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_start_poisoned(dtype):
    """The launchers write every element of nan-filled outputs: log-prob and lse of every row (0 if ignored),
    and the gradient of every row, zero rows included."""
    logits, targets, grad_out = make_inputs(9, BLOCK + 3, dtype)
    targets[0], grad_out[1] = IGNORE, 0.0
    want_out, want_grad = reference(logits, targets, grad_out, 0.7)
    logp = torch.full((9,), float("nan"))
    lse = torch.full((9,), float("nan"))
    triton_kernels.forward_into(logits, targets, IGNORE, 0.7, logp, lse)
    torch.testing.assert_close(logp.double(), want_out, atol=FWD_ATOL, rtol=0)
    assert lse[targets == IGNORE].eq(0).all() and lse.isfinite().all()
    _, torch_lse = torch_ops.forward(logits, targets, IGNORE, 0.7)
    torch.testing.assert_close(lse, torch_lse, atol=FWD_ATOL, rtol=0)
    grads = [triton_kernels.backward_into(grad_out, logits, targets, lse, IGNORE, 0.7,
                                          torch.full_like(logits, float("nan"))),
             torch_ops.backward(grad_out, logits, targets, lse, IGNORE, 0.7, torch.full_like(logits, float("nan")))]
    for grad in grads:
        torch.testing.assert_close(grad.double(), want_grad, atol=GRAD_ATOL, rtol=grad_rtol(dtype))


def _bad(**kwargs):
    args = dict(logits=torch.randn(4, 6), targets=torch.tensor([0, 5, IGNORE, 1]))
    args.update(kwargs)
    return args


@pytest.mark.parametrize("args, error, match", [
    (_bad(logits=[[0.0]]), TypeError, "logits must be a torch.Tensor"),
    (_bad(logits=torch.zeros(4, 6, dtype=torch.int64)), TypeError, "logits must be float32"),
    (_bad(logits=torch.randn(24)), ValueError, "logits must have 2 dimension"),
    (_bad(logits=torch.randn(4, 0)), ValueError, "logits must have at least one column"),
    (_bad(targets=[0, 5, 1, 1]), TypeError, "targets must be a torch.Tensor"),
    (_bad(targets=torch.zeros(4)), TypeError, "targets must be int64 or int32"),
    (_bad(targets=torch.zeros(3, dtype=torch.int64)), ValueError, r"targets must have shape \[N\] = \[4\]"),
    (_bad(targets=torch.tensor([0, 6, 1, 1])), ValueError, r"targets must lie in \[0, 6\).*found 6"),
    (_bad(targets=torch.tensor([0, -1, 1, 1])), ValueError, "targets must lie in.*found -1"),
    (_bad(logits=torch.randn(4, 6, device="meta")), ValueError, r"targets is on \S+ but logits is on meta"),
    (_bad(temperature=0.0), ValueError, "temperature must be > 0"),
    (_bad(temperature=float("nan")), ValueError, "temperature must be > 0"),
    (_bad(inplace_backward=1), TypeError, "inplace_backward must be a bool"),
    (_bad(backend="cuda"), ValueError, "backend must be one of"),
    (_bad(logits=torch.randn(4, 6, dtype=torch.float64), backend="triton"), TypeError,
     "logits: the triton backend takes float32"),
])
def test_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        logprobs_from_logits(**args)
