"""The cost ledger: what each op launches, counted at the headline shape without a GPU (and without allocating
it), and the predicted GPU time against the floors and targets of the GPU-speed design: kernel launches and
host synchronisations counted from the run, GEMMs in whole waves at their layout's rate."""

import importlib
import os
import sys
from dataclasses import replace

import pytest
import torch
from conftest import BACKENDS

from selpo.kernels import ledger, linear_logprobs, linear_selective_loss
from selpo.kernels.streaming import launch, plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmarks_ledger():
    """benchmarks.ledger, imported with the repository root on sys.path only meanwhile (kept there, the folder
    kernels/ would be importable as a top-level module, which transformers would take for the hub's)."""
    sys.path.insert(0, REPO)
    try:
        return importlib.import_module("benchmarks.ledger")
    finally:
        sys.path.remove(REPO)


BENCH = benchmarks_ledger()
HEADLINE, cost_ops, inputs, comm_per_call, GPUS = (getattr(BENCH, name) for name in
                                                   ("HEADLINE", "cost_ops", "inputs", "comm_per_call", "GPUS"))

N, D, V = HEADLINE["n"], HEADLINE["d"], HEADLINE["v"]
GEMM = 2 * N * D * V
SEPO = "SePO loss, 30% selected, forward+backward"


@pytest.fixture(scope="module")
def headline():
    return {c.name: c for c in cost_ops(N, D, V)}


def flops_by_gemm(book):
    out = {}
    for e in book.gemms():
        out[e.name] = out.get(e.name, 0) + e.flops
    return out


def test_gemms_at_the_headline_shape(headline):
    """Forward: one product of all rows; forward+backward: four (logits, recomputed logits, two gradients), three
    with the head frozen; the SePO loss: three over the selected rows only (two frozen); scores: one per model."""
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
    # A frozen head (LoRA): three GEMMs where a trained one has four, none for dL/dweight.
    assert flops_by_gemm(headline["linear_logprobs forward+backward, head frozen (LoRA)"].book) == \
        {"logits": 2 * GEMM, "grad_hidden": GEMM}
    assert flops_by_gemm(headline["SePO loss, 30% selected, head frozen (LoRA)"].book) == \
        {"logits": per_row * selected, "grad_hidden": per_row * selected}


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
    """Doubling a large vocabulary leaves the workspace flat (a smaller one can take less: its equal slices may
    leave the logits buffer below its budget)."""
    small = {c.name: c.book.workspace_bytes for c in cost_ops(N, D, 131072)}
    large = {c.name: c.book.workspace_bytes for c in cost_ops(N, D, 262144)}
    for name in small:
        assert large[name] <= 1.2 * small[name], name


@pytest.mark.parametrize("gpu", ["H100", "H200"])
def test_predictions_meet_the_targets(headline, gpu):
    """Issue 22's targets at the headline shape (the table's; N=2048's in ``test_predictions_at_three_sizes``),
    and a workspace a few percent of naive's."""
    for (name, n), target in BENCH.TARGETS.items():
        if n == N:
            costed = headline[name]
            assert costed.predicted(GPUS[gpu]) <= target * costed.floor(GPUS[gpu]), name
    for name in ("linear_logprobs forward", "linear_logprobs forward+backward", SEPO, "token_scores"):
        assert headline[name].book.workspace_bytes <= 0.04 * headline[name].naive_workspace, name


def gpu(**costs) -> ledger.GPU:
    """A GPU of round numbers: 1 FLOP/s per layout, 1 byte/s, 4 SMs, 2 x 2 tiles, no host costs unless given."""
    base = ledger.GPU({"NT": 1.0, "NN": 1.0, "TN": 1.0}, 1.0, 4, (2, 2), 0.0, 0.0, 0.0)
    return replace(base, **costs)


def gemm(m, n, k, layout="NN", traffic=0, extra=0) -> ledger.Entry:
    return ledger.Entry("g", "gemm", 2 * m * n * k, traffic, extra, (m, n, k), layout)


def test_prediction_model():
    """Deliberately changed from a sum of costs: a GEMM takes the slower of its whole waves and its traffic,
    plus any accumulator read back; the host issues each kernel and the device runs it once issued; a small
    kernel takes at least ``kernel_s``."""
    waves = 4 * 2 * 2 * 2 * 2  # one wave: 4 SMs, each a 2 x 2 tile over k=2 (64 FLOPs at 1 FLOP/s)
    book = ledger.Ledger(entries=[gemm(4, 4, 2, traffic=50, extra=10), ledger.Entry("p", "pass", 0, 7)])
    assert book.predict(gpu()) == pytest.approx(max(waves, 40) + 10 + 7)
    assert book.predict(gpu(bandwidth=100.0)) == pytest.approx(waves + 0.1 + 0.07)
    small = ledger.Ledger(entries=[ledger.Entry("add", "launch", 0, 1)] * 3)
    assert small.predict(gpu(kernel_s=2.0)) == pytest.approx(6.0)  # the device's least time per kernel
    assert small.predict(gpu(launch_s=5.0, kernel_s=2.0)) == pytest.approx(17.0)  # issued every 5 s, the last runs 2


def test_wave_quantization_rounds_up():
    """A GEMM runs in whole waves of tiles (partial tiles counting whole); with fewer tiles than multiprocessors,
    k is split among them."""
    model = gpu()
    one_wave = 4 * 2 * 2 * 2  # 4 SMs, each a 2 x 2 tile over k=1: 32 FLOPs at 1 FLOP/s
    assert model.seconds(gemm(4, 4, 1)) == model.seconds(gemm(3, 4, 1)) == one_wave  # 4 tiles: one wave
    assert model.seconds(gemm(4, 6, 1)) == model.seconds(gemm(4, 8, 1)) == 2 * model.seconds(gemm(4, 4, 1))
    assert model.seconds(gemm(4, 5, 1)) > gemm(4, 5, 1).flops  # 6 tiles: 2 waves, more than the FLOPs alone
    assert model.seconds(gemm(2, 2, 8)) == model.seconds(gemm(4, 4, 2))  # 1 tile: k split 4 ways


def test_rates_per_layout():
    """The hot path's GEMMs read their operands in three layouts, each charged its own rate; the H100's rates
    give back the GEMMs measured on it (benchmarks/h100-2026-11-26/RESULTS-cuda.md), the gradient layouts slower
    than the forward's."""
    for dry_run in (True, False):
        h, w, z = (torch.zeros(shape) for shape in ((6, 4), (10, 4), (6, 10)))
        with ledger.counting(dry_run=dry_run) as book:
            launch.logits(h, w, z)
            launch.grad_weight(z, h, w, accumulate=False)
            launch.grad_hidden(z, w, h, accumulate=False)
        assert [(e.name, e.layout, e.shape) for e in book.gemms()] == \
            [("logits", "NT", (6, 10, 4)), ("grad_weight", "TN", (10, 4, 6)), ("grad_hidden", "NN", (6, 4, 10))]
    fast_forward = gpu(rates={"NT": 2.0, "NN": 1.0, "TN": 1.0})
    assert fast_forward.seconds(gemm(4, 4, 1, "NT")) * 2 == fast_forward.seconds(gemm(4, 4, 1, "NN"))
    h100 = GPUS["H100"]
    for shapes, seconds in BENCH.H100_GEMMS:
        assert sum(h100.seconds(gemm(m, n, k, layout)) for layout, m, n, k in shapes) == pytest.approx(seconds)
    assert h100.rates["NN"] == h100.rates["TN"] < h100.rates["NT"]
    h200 = GPUS["H200"]  # each layout timed apart on an H200 (LEDGER-cuda.md)
    for shapes, seconds in BENCH.H200_GEMMS:
        assert sum(h200.seconds(gemm(m, n, k, layout)) for layout, m, n, k in shapes) == pytest.approx(seconds)
    assert h200.rates["TN"] < h200.rates["NT"] < h200.rates["NN"]


def sepo_book(monkeypatch, chunk_rows: int):
    """The SePO loss's dry-run ledger at a small shape, its chunks of pairs holding up to ``chunk_rows`` rows."""
    n, d, v = 1024, 32, 1024
    monkeypatch.setattr(plan, "LOSS_BUFFER_BYTES", {"cuda": chunk_rows * v * 2, "cpu": chunk_rows * v * 2})
    hidden, weight, targets, cu, mask = inputs(n, d, v, torch.bfloat16, 0.3)
    sepo = BENCH.op_calls(hidden, weight, targets, cu, mask, "triton")
    return BENCH.dry(next(fn for name, (fn, _, _) in sepo.items() if name.startswith("SePO")))


def test_launch_counts_grow_with_the_chunks(monkeypatch):
    """Every launch is counted from the run, the small kernels between the passes too: more chunks, more of
    each; the host synchronisations do not grow with them."""
    one, many = sepo_book(monkeypatch, 1024), sepo_book(monkeypatch, 64)
    chunks = len([e for e in many.gemms() if e.name == "logits"])
    assert len([e for e in one.gemms() if e.name == "logits"]) == 1 and chunks >= 4
    # each chunk adds launches, at most as many as a whole one-chunk call makes
    assert len(one.launches()) < len(many.launches()) <= chunks * len(one.launches())
    small = [len([e for e in book.launches() if e.kind == "launch"]) for book in (one, many)]
    assert small[0] < small[1]
    assert len(one.syncs()) == len(many.syncs()) >= 1


def test_syncs_are_counted_and_charged(monkeypatch):
    """Each way the host waits for the device is a sync (a device value read, ``tolist``, a host tensor copied
    to the device by ``.to``, by ``torch.tensor(device=)`` or by an op that reads it), and ops on host tensors
    launch nothing; a sync costs the device's drain plus ``sync_s``, so every one counts in the prediction."""
    x = torch.arange(6.0)
    with ledger.counting(dry_run=True, device="cuda", launches=True) as book:
        x.nonzero()
        x.sum().item()
        x.tolist()
        counts = torch.tensor([1, 2, 3]).cumsum(0).to(torch.int32)  # on the host: no launch
        counts.to(x.device)
        counts.to(x.device, non_blocking=True)  # a copy on the stream: the host does not wait
        torch.tensor([0, 1], device=x.device)
        x[torch.tensor([0, 2])]
    assert [e.name for e in book.syncs()] == ["nonzero", "_local_scalar_dense", "tolist", "host-to-device copy (to)",
                                              "host-to-device copy (tensor)", "host-to-device copy into index"]
    assert [e.name for e in book.launches()] == ["nonzero", "sum", "host-to-device copy (to)", "index"]
    waits = ledger.Ledger(entries=[gemm(4, 4, 4), ledger.Entry("item", "sync", 0, 0),
                                   ledger.Entry("k", "launch", 0, 0)])
    # issue the GEMM (1), run it (one wave over k=4: 128), the host waits for it then 3, issues (1), runs (1)
    assert waits.predict(gpu(launch_s=1.0, kernel_s=1.0, sync_s=3.0)) == pytest.approx(1 + 128 + 3 + 1 + 1)
    sepo = sepo_book(monkeypatch, 64)
    h100 = GPUS["H100"]
    slower = replace(h100, sync_s=h100.sync_s + 1e-3)
    assert sepo.predict(slower) - sepo.predict(h100) == pytest.approx(len(sepo.syncs()) * 1e-3)


def test_predictions_at_three_sizes(capsys):
    """The table gives every op at N=16384, 2048 and 512 (D=4096, V=128256) on both GPUs, each against its
    floor; the SePO loss meets its target at N=2048."""
    BENCH.main([])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = {(r[0].removeprefix("| "), int(r[1])): [float(cell.split("= ")[1].rstrip("×")) for cell in r[8:10]]
            for r in rows if r[1].isdigit()}
    assert BENCH.NS == (16384, 2048, 512)
    assert sorted(n for _, n in rows) == sorted(BENCH.NS * 7)
    assert all(1.0 <= ratio < 3.0 for ratios in rows.values() for ratio in ratios)
    for (name, n), target in BENCH.TARGETS.items():
        if n == 2048:
            assert max(rows[name, n]) <= target, name


def test_measure_rehearsal_on_cpu(capsys):
    """``--measure``'s code path runs on a CPU at a small shape, so that a typo cannot waste a GPU lease."""
    BENCH.main(["--measure", "--device", "cpu", "--n", "128", "--d", "16", "--v", "512"])
    out = capsys.readouterr().out
    assert "(measured)" in out and "Fitted here: GEMMs at NN" in out and "| NT 128 x 512 x 16 |" in out
    assert "| linear_logprobs forward | 128 |" in out and "| SePO loss, " in out


def test_measure_prints_each_line_when_measured(monkeypatch, capsys):
    """A run stopped midway (here: the timer fails at its fourth GEMM) has printed every line it measured."""
    calls = []

    def timer(fn, device, rounds=5, warmup=2):
        calls.append(fn)
        if len(calls) == 5:  # the copy, then three GEMMs
            raise TimeoutError
        return 1e-3

    monkeypatch.setattr(BENCH, "median_seconds", timer)
    with pytest.raises(TimeoutError):
        BENCH.main(["--measure", "--device", "cpu", "--n", "128", "--d", "16", "--v", "512"])
    lines = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line[:5] in ("| NT ", "| TN ",
                                                                                                   "| NN ")]
    assert lines == ["| NT 128 x 512 x 16", "| TN 512 x 16 x 128", "| NN 128 x 16 x 512"]


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
