"""segment_sum against a float64 loop written here, on every backend, forward and gradient."""

import pytest
import torch
from helpers import cu_seqlens

from selpo.kernels.segment_sum import segment_sum, triton_kernels

BACKENDS = ["naive", "torch", "triton"]
BLOCK = triton_kernels.BLOCK
# Segment lengths: no token, one token, empty segments, and lengths around the Triton block.
LENGTHS = [[], [0], [1], [0, 0], [3, 0, 1, 0, 5], [BLOCK], [2 * BLOCK + 37, 1, 0, BLOCK - 1]]


def reference(values, lengths):
    """float64 sum of each segment, by a Python loop over slices."""
    v = values.detach().double()
    out, start = [], 0
    for n in lengths:
        out.append(v[start:start + n].sum())
        start += n
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def sum_tol(values, lengths):
    """Rounding of an fp32 accumulation over each segment: relative to the sum of magnitudes."""
    v = values.detach().double().abs()
    return 1e-6 * (reference(v, lengths).max().item() + 1.0) if lengths else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(backend, lengths, dtype):
    n = sum(lengths)
    values = torch.randn(n).to(dtype).requires_grad_()
    cu = cu_seqlens(lengths)
    out = segment_sum(values, cu, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (len(lengths),)
    torch.testing.assert_close(out.double(), reference(values, lengths), atol=sum_tol(values, lengths), rtol=0)
    grad_out = torch.randn(len(lengths))
    (grad,) = torch.autograd.grad(out, values, grad_out) if n and lengths else (torch.zeros(0, dtype=dtype),)
    assert grad.dtype == dtype
    want = torch.repeat_interleave(grad_out, torch.tensor(lengths, dtype=torch.int64)).to(dtype)
    torch.testing.assert_close(grad, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_float64(backend):
    lengths = [4, 0, 1, 9]
    values = torch.randn(14, dtype=torch.float64)
    out = segment_sum(values, cu_seqlens(lengths), backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(values, lengths), atol=1e-12, rtol=0)


def test_gradcheck_torch():
    values = torch.randn(12, dtype=torch.float64, requires_grad=True)
    cu = cu_seqlens([5, 0, 1, 6])
    assert torch.autograd.gradcheck(lambda v: segment_sum(v, cu, backend="torch"), (values,))


def test_torch_path_is_correctly_rounded():
    """The torch path accumulates in float64: a long fp32 segment of large, cancelling values comes out
    as the float64 sum rounded once to fp32 (within one ulp), where a plain fp32 running sum would not."""
    values = (torch.randn(50_000) * 1e4).float()
    lengths = [49_000, 1_000]
    want = reference(values, lengths).float()
    got = segment_sum(values, cu_seqlens(lengths), backend="torch")
    torch.testing.assert_close(got, want, rtol=1.2e-7, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_stay_in_their_segment(backend):
    values = torch.randn(10)
    values[1] = float("nan")
    values[5] = float("inf")
    values[6] = float("-inf")
    values[8] = float("inf")
    cu = cu_seqlens([3, 2, 2, 3])  # segments [0,3) nan, [3,5) finite, [5,7) inf-inf, [7,10) inf
    out = segment_sum(values, cu, backend=backend)
    assert torch.isnan(out[0]) and torch.isnan(out[2])
    assert out[3] == float("inf")
    torch.testing.assert_close(out[1].double(), values[3:5].double().sum(), atol=1e-6, rtol=0)


def test_triton_writes_every_output():
    """The launchers fill NaN-poisoned outputs completely: every segment sum and every token gradient."""
    lengths = [BLOCK + 3, 0, 1, 2]
    values = torch.randn(sum(lengths))
    cu = cu_seqlens(lengths)
    sums = torch.full((4,), float("nan"))
    triton_kernels.sum_into(values, cu, sums)
    torch.testing.assert_close(sums.double(), reference(values, lengths), atol=sum_tol(values, lengths), rtol=0)
    grad = torch.full((values.shape[0],), float("nan"), dtype=torch.bfloat16)
    g = torch.tensor([1.5, 2.0, -3.0, 0.25], dtype=torch.bfloat16)
    triton_kernels.broadcast_into(g, cu, grad)
    assert torch.equal(grad, torch.repeat_interleave(g, torch.tensor(lengths)))


def test_triton_no_tokens_gives_zeros():
    out = segment_sum(torch.zeros(0), cu_seqlens([0, 0, 0]), backend="triton")
    assert torch.equal(out, torch.zeros(3))


@pytest.mark.parametrize("values, cu, error, match", [
    ([1.0, 2.0], cu_seqlens([2]), TypeError, "values must be a torch.Tensor"),
    (torch.arange(2), cu_seqlens([2]), TypeError, "values must be float32"),
    (torch.zeros(2, 1), cu_seqlens([2]), ValueError, "values must have 1 dimension"),
    (torch.zeros(2), torch.tensor([0, 2]), TypeError, "cu_seqlens must be int32"),
    (torch.zeros(2), cu_seqlens([1]), ValueError, "cu_seqlens must end at N=2"),
    (torch.zeros(2), torch.tensor([0, 2, 1, 2], dtype=torch.int32), ValueError, "non-decreasing"),
    (torch.zeros(2), cu_seqlens([2], device="meta"), ValueError, "cu_seqlens is on meta"),
])
def test_bad_input(values, cu, error, match):
    with pytest.raises(error, match=match):
        segment_sum(values, cu, backend="torch")


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        segment_sum(torch.zeros(2), cu_seqlens([2]), backend="cuda")
    with pytest.raises(TypeError, match="values: the triton backend takes"):
        segment_sum(torch.zeros(2, dtype=torch.float64), cu_seqlens([2]), backend="triton")
