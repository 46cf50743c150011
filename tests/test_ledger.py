"""The cost ledger: what each op launches, counted at the headline shape without a GPU (and without allocating
it), and the predicted GPU time against the floors and targets of the GPU-speed design."""

import importlib
import os
import sys

import pytest
import torch
from conftest import BACKENDS

from selpo.kernels import ledger, linear_logprobs, linear_selective_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmarks_ledger():
    """benchmarks.ledger, imported with the repository root on sys.path only meanwhile (kept there, the folder
    kernels/ would be importable as a top-level module, which transformers would take for the hub's)."""
    sys.path.insert(0, REPO)
    try:
        return importlib.import_module("benchmarks.ledger")
    finally:
        sys.path.remove(REPO)


HEADLINE, cost_ops, inputs, comm_per_call = (getattr(benchmarks_ledger(), name)
                                             for name in ("HEADLINE", "cost_ops", "inputs", "comm_per_call"))

N, D, V = HEADLINE["n"], HEADLINE["d"], HEADLINE["v"]
GEMM = 2 * N * D * V
# Targets at the headline shape (bf16, H100 rates): predicted time over the floor, and workspace over naive's.
TARGETS = {"linear_logprobs forward": 1.12, "linear_logprobs forward+backward": 1.08,
           "SePO loss, 30% selected, forward+backward": 1.2, "token_scores": 1.15}


@pytest.fixture(scope="module")
def headline():
    return {c.name: c for c in cost_ops(N, D, V)}


def flops_by_gemm(book):
    out = {}
    for e in book.gemms():
        out[e.name] = out.get(e.name, 0) + e.flops
    return out


def test_gemms_at_the_headline_shape(headline):
    """Forward: one product of all rows; forward+backward: four (logits, recomputed logits, two gradients);
    the SePO loss: three over the selected rows only; scores: one per model."""
    assert flops_by_gemm(headline["linear_logprobs forward"].book) == {"logits": GEMM}
    assert flops_by_gemm(headline["linear_logprobs forward+backward"].book) == \
        {"logits": 2 * GEMM, "grad_weight": GEMM, "grad_hidden": GEMM}
    _, _, _, _, mask = inputs(N, D, V, torch.bfloat16, 0.3)
    selected = int(mask.sum())
    assert 0.29 * N < selected < 0.31 * N
    per_row = 2 * D * V
    assert flops_by_gemm(headline["SePO loss, 30% selected, forward+backward"].book) == \
        {"logits": per_row * selected, "grad_weight": per_row * selected, "grad_hidden": per_row * selected}
    assert flops_by_gemm(headline["linear_logprobs backward, 30% of rows"].book) == \
        {"logits": per_row * selected, "grad_weight": per_row * selected, "grad_hidden": per_row * selected}
    assert flops_by_gemm(headline["token_scores"].book) == {"logits": 2 * GEMM}


def test_each_logits_tile_is_read_once(headline):
    """The forward's pass reads each bf16 logit once; the backward's turns each into its gradient in place."""
    def traffic(name, kind):
        return sum(e.bytes for e in headline[name].book.passes() if e.name == kind)

    assert N * V * 2 <= traffic("linear_logprobs forward", "merge_lse") < 1.01 * N * V * 2
    assert 2 * N * V * 2 <= traffic("linear_logprobs forward+backward", "grad_logits") < 1.01 * 2 * N * V * 2


def test_no_full_logits_nor_fp32_weight_buffer(headline):
    for costed in headline.values():
        for shape, dtype in costed.book.buffers:
            numel = torch.Size(shape).numel()
            assert numel < N * V // 8, f"{costed.name}: a buffer of {shape} is a large share of [N, V]"
            assert not (dtype == torch.float32 and numel >= V * D), f"{costed.name}: an fp32 {shape} buffer"


def test_workspace_flat_in_vocabulary():
    small = {c.name: c.book.workspace_bytes for c in cost_ops(N, D, 32768)}
    large = {c.name: c.book.workspace_bytes for c in cost_ops(N, D, 262144)}
    for name in small:
        assert large[name] <= 1.2 * small[name], name


def test_predictions_meet_the_targets(headline):
    for name, target in TARGETS.items():
        costed = headline[name]
        assert costed.predicted("H100") <= target * costed.floor("H100"), name
        assert costed.book.workspace_bytes <= 0.04 * costed.naive_workspace, name


def test_prediction_model():
    """A GEMM is timed by its arithmetic or its traffic, whichever is slower, plus any accumulator read back."""
    book = ledger.Ledger(entries=[ledger.Entry("g", "gemm", 10**12, 10**9, 10**8), ledger.Entry("p", "pass", 0, 10**9)])
    assert book.predict(1e12, 1e9) == pytest.approx(1.0 + 0.1 + 1.0)
    assert book.predict(1e15, 1e9) == pytest.approx(0.9 + 0.1 + 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dry_run_records_what_a_real_run_launches(backend):
    """A dry run's ledger equals a real run's on the same shapes, on either backend: the costs are those of
    the code that runs."""
    def run(hidden, weight, targets, cu, mask):
        logp = linear_logprobs(hidden, weight, targets, backend=backend)
        torch.autograd.grad(logp, (hidden, weight), torch.ones_like(logp))
        loss, _ = linear_selective_loss(hidden, weight, targets, cu, mask=mask, backend=backend)
        torch.autograd.grad(loss, (hidden, weight))

    hidden, weight, targets, cu, mask = inputs(300, 24, 500, torch.float32, 0.3)
    with ledger.counting(dry_run=True) as dry:
        run(hidden, weight, targets, cu, mask)
    real = [t.detach().clone().normal_().requires_grad_() for t in (hidden, weight)]
    with ledger.counting() as wet:
        run(*real, targets, cu, mask)
    assert dry.entries == wet.entries and dry.workspace_bytes == wet.workspace_bytes


def test_vocabulary_parallel_communication():
    """A sharded head sends two fp32 [n] vectors in the forward and the fp32 [n, D] hidden gradient in the
    backward: a few hundred MB at the headline shape, never the [N, V] logits."""
    text = comm_per_call(N, D, V, 8)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["linear_logprobs forward+backward"].endswith(f"| 3 | {(12 * N + 4 * N * D) / 1e6:.1f} MB |")
    assert "| SePO loss, forward+backward | 3 |" in text
