"""topk_mask on every backend against a float64 brute-force count written here, properties, and bad input."""

import math
from fractions import Fraction

import pytest
import torch
from helpers import cu_seqlens
from hypothesis import given, settings
from hypothesis import strategies as st

from selpo.kernels.topk_mask import topk_mask, triton_kernels
from selpo.kernels.topk_mask.counts import select_counts

BACKENDS = ["naive", "torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# N = 0 with and without segments, N = 1, empty and length-1 segments, and lengths around and past the
# Triton blocks (64): several blocks of i and of j per segment, none a multiple of the block but 64.
LENGTHS = [[], [0, 0], [1], [2, 0, 1], [5, 64, 1, 0, 65, 130, 3, 17]]
# Ratios whose float product with n lands just below an integer (0.57 * 100, 1/3 * 3 in some dtypes).
RATIOS = [Fraction(3, 10), Fraction(1, 3), Fraction(57, 100), Fraction(1)]


def reference(scores, bounds, ratio, largest, valid, counts=None):
    """bool [N] by brute force in float64: token i is kept when fewer than k valid tokens of its segment beat it
    (k from ``ratio``, or ``counts[segment]`` where given)."""
    s, ok, out = scores.double().tolist(), valid.tolist(), [False] * scores.shape[0]
    for seg, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        tokens = [i for i in range(start, end) if ok[i]]
        k = counts[seg] if counts is not None else max(1, math.floor(ratio * len(tokens))) if tokens else 0
        for i in tokens:
            better = [j for j in tokens if (s[j] > s[i] if largest[seg] else s[j] < s[i]) or (s[j] == s[i] and j < i)]
            out[i] = len(better) < k
    return torch.tensor(out, dtype=torch.bool)


def make_scores(n, dtype, kind):
    """Random scores: "ties" small integers with signed zeros, "inf" the same with +-inf, "randn" Gaussian."""
    if kind == "randn":
        return torch.randn(n).to(dtype)
    scores = torch.randint(-3, 4, (n,)).double()
    scores = torch.where((scores == 0) & (torch.rand(n) < 0.5), -0.0, scores)
    if kind == "inf":
        scores = torch.where(torch.rand(n) < 0.15, math.inf, scores)
        scores = torch.where(torch.rand(n) < 0.15, -math.inf, scores)
    return scores.to(dtype)


def make_valid(lengths):
    """About 3/4 of the tokens valid; the first segment of 2+ tokens has none."""
    valid = torch.rand(sum(lengths)) < 0.75
    bounds = cu_seqlens(lengths).tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end - start >= 2:
            valid[start:end] = False
            break
    return valid


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["ties", "inf", "randn"])
def test_matches_reference(backend, dtype, kind):
    for lengths in LENGTHS:
        cu = cu_seqlens(lengths)
        for r, ratio in enumerate(RATIOS):
            scores = make_scores(cu[-1].item(), dtype, kind)
            valid = make_valid(lengths)
            scores[~valid & (torch.rand(scores.shape[0]) < 0.5)] = math.nan  # ignored: those tokens are invalid
            # A plain bool for two of the ratios, a per-segment tensor for the others.
            largest = [True, False][r] if r < 2 else torch.rand(len(lengths)) < 0.5
            flags = [largest] * len(lengths) if isinstance(largest, bool) else largest.tolist()
            got = topk_mask(scores, cu, float(ratio), largest=largest, valid=valid, backend=backend)
            want = reference(scores, cu.tolist(), ratio, flags, valid)
            assert got.dtype == torch.bool and got.shape == want.shape
            assert torch.equal(got, want), f"lengths={lengths} ratio={ratio} largest={largest}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_valid_and_strided_scores(backend):
    """valid defaults to all tokens; a strided view of scores is read by element, not by storage."""
    lengths = [9, 0, 70]
    cu = cu_seqlens(lengths)
    scores = torch.randint(-2, 3, (2 * sum(lengths),)).float()[::2]
    got = topk_mask(scores, cu, 0.4, backend=backend)
    want = reference(scores, cu.tolist(), Fraction(2, 5), [True] * 3, torch.ones(sum(lengths), dtype=torch.bool))
    assert torch.equal(got, want)
    assert got.sum().item() == 3 + 28


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_zero_and_inf_order(backend):
    """-0.0 equals 0.0 (ties go to the lower position); +-inf rank as the extreme values."""
    cu = cu_seqlens([4, 4])
    scores = torch.tensor([0.0, -0.0, -0.0, 0.0, math.inf, -math.inf, math.inf, 1.0])
    largest = topk_mask(scores, cu, 0.5, backend=backend)
    smallest = topk_mask(scores, cu, 0.5, largest=False, backend=backend)
    assert largest.tolist() == [True, True, False, False, True, False, True, False]
    assert smallest.tolist() == [True, True, False, False, False, True, False, True]


def test_counts_are_exact_floors():
    """k = floor(p * n / q) exactly, though the float product of ratio and n may land just below an integer."""
    assert 0.57 * 100 < 57  # the float trap
    n = torch.tensor([0, 1, 2, 3, 7, 10, 99, 100, 1000, 12345, 2**31 - 1])
    for ratio in [Fraction(3, 10), Fraction(57, 100), Fraction(1, 3), Fraction(2, 7), Fraction(7, 10),
                  Fraction(12345, 100000), Fraction(1)]:
        want = [max(1, math.floor(ratio * m)) if m else 0 for m in n.tolist()]
        assert select_counts(float(ratio), n).tolist() == want, ratio


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_same_on_every_backend(backend):
    """ratio 0.57 of 100 tokens selects 57 everywhere, though 0.57 * 100 < 57 in floating point."""
    lengths = [100, 10, 3]
    for ratio, want in [(0.57, [57, 5, 1]), (0.3, [30, 3, 1]), (1 / 3, [33, 3, 1])]:
        mask = topk_mask(torch.randn(113), cu_seqlens(lengths), ratio, backend=backend)
        assert [int(part.sum()) for part in mask.split(lengths)] == want, ratio


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_counts_select_that_many(backend):
    """counts instead of ratio: segment s keeps exactly counts[s] of its valid tokens, from none to all of them."""
    for c, lengths in enumerate(LENGTHS):
        cu = cu_seqlens(lengths)
        scores = make_scores(cu[-1].item(), torch.float32, "ties")
        valid = make_valid(lengths)
        bounds = cu.tolist()
        n_valid = [int(valid[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        dtype = torch.int32 if c % 2 else torch.int64
        counts = torch.tensor([int(torch.randint(0, m + 1, ())) for m in n_valid], dtype=dtype)
        largest = torch.rand(len(lengths)) < 0.5
        got = topk_mask(scores, cu, counts=counts, largest=largest, valid=valid, backend=backend)
        assert [int(got[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])] == counts.tolist()
        assert torch.equal(got, reference(scores, bounds, None, largest.tolist(), valid, counts=counts.tolist()))


def test_bad_counts():
    scores, cu = torch.randn(6), cu_seqlens([2, 4])
    with pytest.raises(TypeError, match="exactly one of ratio and counts, got both"):
        topk_mask(scores, cu, 0.5, counts=torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="exactly one of ratio and counts, got neither"):
        topk_mask(scores, cu)
    for counts in (torch.tensor([1.0, 1.0]), [1, 1]):
        with pytest.raises(TypeError, match="counts must be an int32 or int64 tensor"):
            topk_mask(scores, cu, counts=counts)
    with pytest.raises(ValueError, match=r"counts must have shape \[S\] = \[2\]"):
        topk_mask(scores, cu, counts=torch.tensor([1, 1, 1]))
    valid = torch.tensor([True, False, True, True, True, True])
    with pytest.raises(ValueError, match=r"counts\[0\] = 2 must lie in \[0, 1\], the number of valid tokens of "
                                         "segment 0"):
        topk_mask(scores, cu, counts=torch.tensor([2, 1]), valid=valid)
    with pytest.raises(ValueError, match=r"counts\[1\] = -1 must lie in \[0, 4\]"):
        topk_mask(scores, cu, counts=torch.tensor([1, -1]))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("backend", BACKENDS)
def test_properties(backend, data):
    """k selected per segment, none invalid, selected scores dominate the rest, ties to the lower position."""
    lengths = data.draw(st.lists(st.integers(0, 12), max_size=5), label="lengths")
    n = sum(lengths)
    values = data.draw(st.lists(st.sampled_from([-math.inf, -1.5, -0.0, 0.0, 2.0, 2.5, math.inf]),
                                min_size=n, max_size=n), label="scores")
    valid = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="valid")
    largest = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)), label="largest")
    q = data.draw(st.integers(1, 20), label="q")
    ratio = Fraction(data.draw(st.integers(1, q), label="p"), q)
    mask = topk_mask(torch.tensor(values, dtype=torch.float32), cu_seqlens(lengths), float(ratio),
                     largest=torch.tensor(largest, dtype=torch.bool), valid=torch.tensor(valid, dtype=torch.bool),
                     backend=backend).tolist()
    bounds = cu_seqlens(lengths).tolist()
    for seg, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        tokens = [i for i in range(start, end) if valid[i]]
        kept = [i for i in tokens if mask[i]]
        dropped = [i for i in tokens if not mask[i]]
        assert not any(mask[i] for i in range(start, end) if not valid[i])
        assert len(kept) == (max(1, math.floor(ratio * len(tokens))) if tokens else 0)
        for i in kept:
            for j in dropped:
                sign = 1 if largest[seg] else -1
                assert sign * values[i] >= sign * values[j]
                assert values[i] != values[j] or i < j


def test_triton_output_is_checked(monkeypatch):
    """The Triton output starts poisoned: an element no program writes raises instead of reading as a choice."""

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(triton_kernels, "_topk_mask_kernel", NoLaunch())
    with pytest.raises(RuntimeError, match="unwritten"):
        topk_mask(torch.randn(5), cu_seqlens([5]), 0.5, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scores_raise(backend):
    scores = torch.tensor([1.0, math.nan, 2.0])
    with pytest.raises(ValueError, match="scores"):
        topk_mask(scores, cu_seqlens([3]), 0.5, backend=backend)
    # The same NaN at an invalid token is ignored.
    mask = topk_mask(scores, cu_seqlens([3]), 0.5, valid=torch.tensor([True, False, True]), backend=backend)
    assert mask.tolist() == [False, False, True]


def test_bad_input():
    scores, cu = torch.randn(6), cu_seqlens([2, 4])
    for ratio in (0, 0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="ratio"):
            topk_mask(scores, cu, ratio)
    for ratio in ("0.5", True, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="ratio"):
            topk_mask(scores, cu, ratio)
    with pytest.raises(TypeError, match="scores"):
        topk_mask(torch.arange(6), cu, 0.5)
    with pytest.raises(ValueError, match="scores"):
        topk_mask(scores[None], cu, 0.5)
    with pytest.raises(TypeError, match="cu_seqlens"):
        topk_mask(scores, cu.long(), 0.5)
    for bad in ([0, 2, 5], [1, 2, 6], [0, 4, 2, 6]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            topk_mask(scores, torch.tensor(bad, dtype=torch.int32), 0.5)
    with pytest.raises(TypeError, match="valid"):
        topk_mask(scores, cu, 0.5, valid=torch.ones(6))
    with pytest.raises(ValueError, match="valid"):
        topk_mask(scores, cu, 0.5, valid=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="largest"):
        topk_mask(scores, cu, 0.5, largest=torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="largest"):
        topk_mask(scores, cu, 0.5, largest=1)
    with pytest.raises(ValueError, match="largest"):
        topk_mask(scores, cu, 0.5, largest=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        topk_mask(scores, cu, 0.5, backend="cuda")
