"""merge_lse, the forward's pass, on both backends against float64 math on the same tile: folded into a running
(max, sum) already holding earlier slices, with bias, softcap and temperature, over sizes that leave a partial
last block; the Triton kernel also split along the vocabulary as for few rows. And the plan's equal slices."""

import pytest
import torch
from conftest import BACKENDS

from selpo.kernels import ledger
from selpo.kernels.streaming import passes_triton, plan
from selpo.kernels.streaming.passes import Passes, finish_lse

BLOCK = passes_triton.BLOCK_V
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Columns: one, fewer than a 16-byte group, a partial block, whole blocks, and whole blocks plus a tail.
COLS = [1, 5, 300, 2 * BLOCK, 2 * BLOCK + 77]
OPTIONS = [dict(temperature=1.0, softcap=None, bias=False), dict(temperature=0.7, softcap=None, bias=True),
           dict(temperature=1.3, softcap=3.0, bias=True)]


def want_lse(x, bias, m, s, temperature, softcap):
    """float64 log-sum-exp over the tile's transformed logits and what m and s held before."""
    z = x.double() + (0 if bias is None else bias.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.logaddexp(torch.logsumexp(z / temperature, dim=1), m.double() + s.double().log())


def fold(backend, x, bias, options, splits=None):
    """finish_lse of the running (m, s) after folding x into rows that already hold two earlier values."""
    r = x.shape[0]
    m = torch.randn(r) * 3
    s = torch.rand(r) + 0.5
    if r > 1:
        m[1], s[1] = float("-inf"), 0.0  # a row with nothing folded yet
    want = want_lse(x, bias, m, s, options["temperature"], options["softcap"])
    if splits is None:
        Passes(backend, options["temperature"], options["softcap"]).merge_lse_(x, bias, m, s)
    else:
        passes_triton.merge_lse_split_(x, bias, m, s, options["temperature"], options["softcap"], splits=splits)
    return finish_lse(m, s).double(), want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "bias-T", "bias-softcap-T"])
def test_matches_float64(backend, dtype, cols, options):
    x = (torch.randn(3, cols) * 4).to(dtype)
    bias = (torch.randn(cols) * 0.5).to(dtype) if options["bias"] else None
    got, want = fold(backend, x, bias, options)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits, programs", [(2, 2), (3, 3), (7, 6)])
@pytest.mark.parametrize("options", OPTIONS[::2], ids=["plain", "bias-softcap-T"])
def test_split_along_the_vocabulary(dtype, splits, programs, options):
    """Programs take equal runs of whole blocks, the last a partial one; asking more programs than blocks gives
    one per block; the parts are folded by the second launch into the running (m, s)."""
    cols = 5 * BLOCK + 77
    x = (torch.randn(5, cols) * 4).to(dtype)
    bias = (torch.randn(cols) * 0.5).to(dtype) if options["bias"] else None
    got, want = fold("triton", x, bias, options, splits=splits)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-6), (got - want).abs().max()
    assert passes_triton.vocab_split(5, cols, x.device, splits)[0] == programs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [0, 1])
def test_no_or_one_row(backend, rows):
    x = torch.randn(rows, 300)
    got, want = fold(backend, x, None, OPTIONS[0])
    assert got.shape == (rows,) and torch.allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("backend, splits", [("torch", None), ("triton", None), ("triton", 3)])
def test_nonfinite_rows(backend, splits):
    """A row of only -inf keeps lse -inf; a row holding nan or +inf gets nan; the others are untouched."""
    cols = 2 * BLOCK + 77
    x = torch.randn(4, cols)
    x[0] = float("-inf")
    x[1, 2 * BLOCK + 5] = float("nan")
    x[2, 7] = float("inf")
    m = torch.full((4,), float("-inf"))
    s = torch.zeros(4)
    if splits:
        passes_triton.merge_lse_split_(x, None, m, s, 1.0, None, splits=splits)
    else:
        Passes(backend, 1.0, None).merge_lse_(x, None, m, s)
    lse = finish_lse(m, s)
    assert lse[0] == float("-inf") and lse[1].isnan() and lse[2].isnan()
    assert torch.allclose(lse[3].double(), torch.logsumexp(x[3].double(), 0), atol=2e-5)


def test_split_engages_when_rows_are_few():
    """On a 132-SM GPU (what CPU tensors model): 512 rows of a 128k vocabulary take 4 programs each (2,048
    programs, the 16 of each SM in one wave); 2,048 rows, one; one row, at most one per 4 blocks of columns (13
    of 5 blocks each: programs take equal runs of whole blocks)."""
    cpu = torch.device("cpu")
    assert passes_triton.sm_count(cpu) == 132
    assert passes_triton.vocab_split(512, 128256, cpu) == (4, 32768)
    assert passes_triton.vocab_split(1024, 128256, cpu)[0] == 2
    assert passes_triton.vocab_split(2048, 64128, cpu) == (1, 65536)
    assert passes_triton.vocab_split(1, 128256, cpu) == (13, 5 * BLOCK)
    assert passes_triton.vocab_split(4, 300, cpu) == (1, BLOCK)


def test_ledger_counts_the_second_launch():
    """Split, merge_lse is two launches: the tile into [2, rows, splits] parts, then the parts into (m, s)."""
    x = torch.randn(2, 2 * passes_triton.MIN_SPAN)
    m, s = torch.full((2,), float("-inf")), torch.zeros(2)
    with ledger.counting() as book:
        Passes("triton", 1.0, None).merge_lse_(x, None, m, s)
    assert [e.name for e in book.passes()] == ["merge_lse", "merge_lse_parts"]
    assert book.passes()[1].bytes == 2 * 2 * 2 * 4 + 2 * 2 * 2 * 4
    assert torch.allclose(finish_lse(m, s).double(), torch.logsumexp(x.double(), 1), atol=2e-5)


@pytest.mark.parametrize("vocab", [1, 5, 128, 129, 300, 32000, 49152, 50257, 128256, 151936])
@pytest.mark.parametrize("cols", [1, 200, 2048, 8192, 32768, 65536])
def test_slices_are_equal(vocab, cols):
    """The fewest slices that fit the width, covering the vocabulary in order; all multiples of ALIGN but the
    last, differing by at most ALIGN; the same slices from the width the plan hands out."""
    most = plan.aligned(cols, vocab)
    cut = plan.slices(vocab, most)
    widths = [b - a for a, b in cut]
    assert cut[0][0] == 0 and cut[-1][1] == vocab and all(a[1] == b[0] for a, b in zip(cut, cut[1:]))
    assert len(cut) == -(-vocab // most) and max(widths) <= most
    assert all(w % plan.ALIGN == 0 for w in widths[:-1])
    assert max(widths[:-1], default=0) - min(widths[:-1], default=0) <= plan.ALIGN
    assert widths[-1] > max(widths) - 2 * plan.ALIGN
    width = plan.even_width(cols, vocab)
    assert width == max(widths) and plan.slices(vocab, width) == cut


def test_slice_widths_at_known_shapes():
    """Llama 3's vocabulary in backward slices of at most 8,192 columns (16k rows of bf16 in 256 MiB) and in
    forward slices of at most 32,768 (4,096 rows); SmolLM2's in forward slices of at most 32,768."""
    def widths(vocab, cols):
        return sorted({b - a for a, b in plan.slices(vocab, plan.even_width(cols, vocab))})
    assert widths(128256, 8192) == [7936, 8064]
    assert widths(128256, 32768) == [32000, 32128]
    assert widths(49152, 32768) == [24576]
    assert plan.forward_tiles(16384, 128256, 2, 1 << 28) == (4096, 32128)
    assert plan.backward_groups(16384, 128256, 2, 1 << 28) == (16384, 8064)


def test_linear_logprobs_splits_few_rows():
    """Through the op: three rows of a vocabulary of two MIN_SPANs and a tail take two programs each, and their
    log-probs and gradients match the float64 naive path."""
    from selpo.kernels import linear_logprobs

    v = 2 * passes_triton.MIN_SPAN + 77
    assert passes_triton.vocab_split(3, v, torch.device("cpu"))[0] == 2
    hidden, weight = torch.randn(3, 8), torch.randn(v, 8) * 0.5
    targets = torch.tensor([0, v - 1, 4321])
    got = linear_logprobs(hidden, weight, targets, backend="triton", temperature=0.9)
    want = linear_logprobs(hidden.double(), weight.double(), targets, backend="naive", temperature=0.9)
    assert torch.allclose(got.double(), want, atol=2e-5)
