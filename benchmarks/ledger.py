"""The cost ledger: what each op's GPU route launches at a given shape, and the time that predicts, without a GPU.

Every op runs in a dry run (``selpo.kernels.ledger``) on the CPU, standing in for CUDA: its inputs are
zero-stride tensors of the real shape (one row of storage), the schedule plans for CUDA and takes its route
(the triton backend), each GEMM and memory-bound pass records the FLOPs and bytes of the tensors it is handed
instead of running, each Triton kernel is counted and skipped, and every other aten op on a device tensor (the
small kernels on [rows] vectors) is counted as a launch, every host synchronisation as a sync, in order.
``Ledger.predict`` lays them on a timeline of host and device (``ledger.GPU``): a GEMM in whole waves of
cuBLAS tiles at its layout's measured rate, a pass or a small kernel at the bandwidth (KERNEL_S at least), the
host issuing each kernel in LAUNCH_S and waiting out each sync. The floor is the op's unavoidable GEMMs alone,
each over all its rows at once, costed the same way (the suite's floor, benchmarks/harness.floor_step).

    python -m benchmarks.ledger                       # bf16, D=4096, V=128256 at N=16384, 2048 and 512, H100 and H200
    python -m benchmarks.ledger --n 16384 --d 576 --v 49152
    python -m benchmarks.ledger --measure             # on a GPU: its costs, each GEMM shape of the plan and each op
                                                      # timed beside its prediction, each line printed when measured
    python -m benchmarks.ledger --measure --device cpu --n 256 --d 64 --v 2048   # the same code path on a CPU: a
                                                      # rehearsal (its times say nothing of a GPU's)
    python -m benchmarks.ledger --world 8             # a vocabulary-parallel head over 8 processes: what each sends
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass

import torch

from selpo.kernels import ledger, linear_logprobs, linear_selective_loss, token_scores, topk_mask
from selpo.kernels.streaming import launch

from .family_logprobs import PRODUCTS

# A frozen head's floors (a LoRA model's, selpo.lora): the same products without dL/dweight.
FROZEN = {case: tuple(p for p in products if p != "grad_weight") for case, products in PRODUCTS.items()}
HEADLINE = dict(n=16384, d=4096, v=128256)
# The row counts the table predicts at: a long packed batch, a micro-batch, a small one.
NS = (16384, 2048, 512)
# Responses of this many tokens, laid out as pairs (chosen then rejected), for the losses and the selection.
RESPONSE_TOKENS = 128
# Predicted time over the floor that issue 22 asks for, on either GPU: (op, N) -> ratio.
TARGETS = {("linear_logprobs forward", 16384): 1.12, ("linear_logprobs forward+backward", 16384): 1.10,
           ("SePO loss, 30% selected, forward+backward", 16384): 1.2,
           ("SePO loss, 30% selected, forward+backward", 2048): 1.4}

# H100 SXM5 and H200 SXM both have 132 multiprocessors (NVIDIA's datasheets; PyTorch read 132 on an H200 lent
# here, 2026-10-28).
SMS = 132
# The output tile every GEMM is taken to run in: cuBLAS's usual bf16 tile on Hopper (its sm90 kernels named
# ..._128x256x64_...). An assumption until ``--measure`` times the plan's shapes.
TILE = (128, 256)
# Host-side costs, the same on both GPUs; assumptions until ``--measure`` measures the first and the last.
# LAUNCH_S: issue 22's estimate for a small torch op on an H100, Python dispatch included (~4-5 us).
# KERNEL_S: the least time a kernel holds the device back to back in a stream (round figure, ~2 us).
# SYNC_S: a synchronisation's round trip once the device has drained: the host's wake-up and a small copy.
LAUNCH_S, KERNEL_S, SYNC_S = 5e-6, 2e-6, 10e-6
# GEMMs measured on an H100 80GB HBM3 (h100-2026-11-26/RESULTS-cuda.md, 2026-11-26: the floors' medians, bf16,
# cuBLAS through torch 2.11): the GEMMs ((layout, m, n, k), ...) timed together, and their seconds. The forward
# layout alone (741 TFLOP/s); the two gradient layouts only together, in the backward's floor (679 TFLOP/s; 666 from the
# forward+backward floor less the forward): each takes the pair's rate until ``--measure`` times them apart.
H100_GEMMS = [((("NT", 16384, 128256, 4096),), 23.22e-3),
              ((("NN", 16384, 4096, 128256), ("TN", 128256, 4096, 16384)), 50.67e-3)]
# GEMMs measured on an H200 lent here (LEDGER-cuda.md, 2026-12-04: `--measure`, each layout timed apart at
# N=16384, bf16, cuBLAS through torch 2.11), with its copies (4.14 TB/s), a small kernel's issue on the host
# (12.7 us, Python dispatch included) and a sync (10.0 us, as assumed for the H100) measured in the same call.
H200_GEMMS = [((("NT", 16384, 128256, 4096),), 25.307e-3), ((("NN", 16384, 4096, 128256),), 25.335e-3),
              ((("TN", 128256, 4096, 16384),), 25.524e-3)]
H200_LAUNCH_S = 12.7e-6
# Memory bandwidth, bytes read and written per second by a device-to-device copy: the H100's as GPU-NOTES.md
# gives it (2026-11-30), the H200's measured on one lent here (2026-12-04).
BANDWIDTH = {"H100": 3.0e12, "H200": 4.14e12}


def calibrated(timings, sms: int = SMS, tile: tuple[int, int] = TILE) -> dict[str, float]:
    """Each layout's full-wave rate from GEMMs timed together (``timings``: [((layout, m, n, k), ...), seconds]):
    their whole waves' FLOPs over their time, so that the model gives the measured time back."""
    probe = ledger.GPU({}, 1.0, sms, tile, 0.0, 0.0, 0.0)
    rates = {}
    for shapes, seconds in timings:
        rate = sum(probe.wave_flops(m, n, k) for _, m, n, k in shapes) / seconds
        rates.update((layout, rate) for layout, *_ in shapes)
    return rates


H100 = ledger.GPU(calibrated(H100_GEMMS), BANDWIDTH["H100"], SMS, TILE, LAUNCH_S, KERNEL_S, SYNC_S)
GPUS = {"H100": H100, "H200": ledger.GPU(calibrated(H200_GEMMS), BANDWIDTH["H200"], SMS, TILE, H200_LAUNCH_S, KERNEL_S,
                                        SYNC_S)}


@dataclass
class Costed:
    """One op at one shape: its ledger (launches and syncs counted) and its floor's (the unavoidable GEMMs)."""

    name: str
    n: int
    book: ledger.Ledger
    floor_book: ledger.Ledger
    naive_workspace: int

    def predicted(self, gpu: ledger.GPU) -> float:
        return self.book.predict(gpu)

    def floor(self, gpu: ledger.GPU) -> float:
        return self.floor_book.predict(gpu)


def inputs(n: int, d: int, v: int, dtype: torch.dtype, ratio: float, seed: int = 0):
    """Dry inputs of the shape (zero-stride hidden and weight), real targets, pair boundaries and a mask."""
    gen = torch.Generator().manual_seed(seed)
    hidden = ledger.dry_input((n, d), dtype).requires_grad_()
    weight = ledger.dry_input((v, d), dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    segments = max(2, n // RESPONSE_TOKENS // 2 * 2)
    cu = torch.linspace(0, n, segments + 1).round().to(torch.int32)
    largest = torch.arange(segments) < segments // 2
    mask = topk_mask(torch.randn(n, generator=gen), cu, ratio, largest=largest, backend="torch")
    return hidden, weight, targets, cu, mask


def dry(fn, launches: bool = True) -> ledger.Ledger:
    """The ledger of ``fn`` run dry on the CPU, standing in for CUDA (with its launches and syncs)."""
    with ledger.counting(dry_run=True, device="cuda", launches=launches) as book:
        fn()
    return book


def floor_book(rows: int, d: int, v: int, dtype: torch.dtype, products) -> ledger.Ledger:
    """The suite's floor (benchmarks/harness.floor_step): ``products`` among "logits" (h @ w.T), "grad_hidden"
    (dz @ w) and "grad_weight" (dz.T @ h), each over all ``rows`` at once, recorded by the hot path's launchers."""
    h, w, z = (ledger.dry_input(shape, dtype) for shape in ((rows, d), (v, d), (rows, v)))
    gemms = {"logits": lambda: launch.logits(h, w, z), "grad_hidden": lambda: launch.grad_hidden(z, w, h, False),
             "grad_weight": lambda: launch.grad_weight(z, h, w, False)}
    with ledger.counting(dry_run=True, device="cuda") as book:
        for product in products:
            gemms[product]()
    return book


def op_calls(hidden, weight, targets, cu, mask, backend: str) -> dict:
    """name -> (a call of the op, the rows and products of its floor): what the ledger costs and ``--measure``
    times."""
    n = hidden.shape[0]
    selected = int(mask.sum())

    def forward():
        with torch.no_grad():
            linear_logprobs(hidden, weight, targets, backend=backend)

    def forward_backward():
        logp = linear_logprobs(hidden, weight, targets, backend=backend)
        torch.autograd.grad(logp, (hidden, weight), torch.ones_like(logp))

    def forward_backward_frozen():  # a LoRA model's head (selpo.lora): no dL/dweight
        logp = linear_logprobs(hidden, weight.detach(), targets, backend=backend)
        torch.autograd.grad(logp, hidden, torch.ones_like(logp))

    def sepo():
        loss, _ = linear_selective_loss(hidden, weight, targets, cu, mask=mask, loss="sepo", backend=backend)
        torch.autograd.grad(loss, (hidden, weight))

    def sepo_frozen():
        loss, _ = linear_selective_loss(hidden, weight.detach(), targets, cu, mask=mask, loss="sepo", backend=backend)
        torch.autograd.grad(loss, hidden)

    def scores():  # topk_mask then reads the [N] scores once: nothing next to this
        h, w = hidden.detach(), weight.detach()
        token_scores(h, w, h, w, targets, backend=backend)

    percent = round(100 * selected / n)
    return {"linear_logprobs forward": (forward, n, PRODUCTS["fwd"]),
            "linear_logprobs forward+backward": (forward_backward, n, PRODUCTS["fwd+bwd"]),
            "linear_logprobs forward+backward, head frozen (LoRA)": (forward_backward_frozen, n,
                                                                     FROZEN["fwd+bwd"]),
            f"SePO loss, {percent}% selected, forward+backward": (sepo, selected, PRODUCTS["bwd-30%"]),
            f"SePO loss, {percent}% selected, head frozen (LoRA)": (sepo_frozen, selected, FROZEN["bwd-30%"]),
            "token_scores": (scores, n, ("logits", "logits"))}


def cost_ops(n: int, d: int, v: int, dtype: torch.dtype = torch.bfloat16, ratio: float = 0.3) -> list[Costed]:
    """The ledger of every op at this shape, on CUDA's route (the triton backend)."""
    hidden, weight, targets, cu, mask = inputs(n, d, v, dtype, ratio)
    selected = int(mask.sum())
    # Lower bounds of naive's workspace: its forward holds the fp32 logits and their log-softmax (saved for the
    # backward); its backward adds the fp32 gradient of the log-softmax and the half gradient of the logits.
    # (Measured on an H100 at the headline shape: 15.7 GiB forward, 22.4 GiB forward+backward.)
    naive, naive_bwd = 2 * n * v * 4, n * v * (4 + 4 + dtype.itemsize)

    def backward_selected():
        with ledger.counting(dry_run=True, device="cuda"):  # the forward is not part of this measure
            logp = linear_logprobs(hidden, weight, targets, backend="triton")
        torch.autograd.grad(logp, (hidden, weight), mask.float())

    calls = op_calls(hidden, weight, targets, cu, mask, "triton")
    costed = [Costed(name, n, dry(fn), floor_book(rows, d, v, dtype, products),
                     naive_bwd if "backward" in name else naive) for name, (fn, rows, products) in calls.items()]
    costed.insert(2, Costed(f"linear_logprobs backward, {round(100 * selected / n)}% of rows", n,
                            dry(backward_selected), floor_book(selected, d, v, dtype, PRODUCTS["bwd-30%"]),
                            naive_bwd))
    return costed


def comm_per_call(n: int, d: int, v: int, world: int, dtype: torch.dtype = torch.bfloat16, ratio: float = 0.3) -> str:
    """What one process of a vocabulary-parallel head (``world`` even shards) sends into all-reduces per call,
    beside the bytes of the [N, V] logits that gathering them would move. The shard is planted directly (the
    ledger's dry run has no process group); the collectives are recorded where the ops make them."""
    from selpo.kernels.linear_logprobs import LinearLogprobs
    from selpo.kernels.losses.sepo import SEPO
    from selpo.kernels.selective_loss.compact import CompactLoss
    from selpo.kernels.streaming.fused_loss import selective_loss_fused
    from selpo.kernels.streaming.passes import Passes
    from selpo.kernels.streaming.shard import VocabShard

    hidden, _, targets, cu, mask = inputs(n, d, v, dtype, ratio)
    size = -(-v // world)
    weight = ledger.dry_input((size, d), dtype).requires_grad_()
    shard = VocabShard(None, 0, size, v)

    def forward_backward():
        logp = LinearLogprobs.apply(hidden, weight, targets, None, -100, 1.0, None, "torch", shard)
        torch.autograd.grad(logp, (hidden, weight), torch.ones_like(logp))

    def sepo():
        rows = torch.nonzero(mask).squeeze(1)
        cu_sel = torch.cat([torch.zeros(1, dtype=torch.int64), mask.long().cumsum(0)])[cu.long()].tolist()
        start_loss = functools.partial(CompactLoss, SEPO, SEPO.check_options({}), {}, "torch", torch.float32, True)
        selective_loss_fused(Passes("torch", 1.0, None), hidden.detach(), weight.detach(), None, targets, cu_sel, rows,
                             True, start_loss, (True, True, False), shard)

    lines = [f"Vocabulary-parallel head over {world} processes (shards of {size} rows), N={n}, D={d}, V={v}: "
             f"bytes each process sends into all-reduces per call (the [N, V] logits in {dtype}: "
             f"{n * v * dtype.itemsize / 1e9:.2f} GB)\n", "| op | all-reduces | bytes |", "|---|---|---|"]
    for name, fn in (("linear_logprobs forward+backward", forward_backward), ("SePO loss, forward+backward", sepo)):
        comm = [e for e in dry(fn, launches=False).entries if e.kind == "comm"]
        lines.append(f"| {name} | {len(comm)} | {sum(e.bytes for e in comm) / 1e6:.1f} MB |")
    return "\n".join(lines)


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def describe(gpu: ledger.GPU) -> str:
    """The costs a GPU is charged at, in one line."""
    rates = ", ".join(f"{layout} {rate / 1e12:.0f}" for layout, rate in sorted(gpu.rates.items()))
    return (f"GEMMs at {rates} TFLOP/s in whole waves of {gpu.tile[0]}x{gpu.tile[1]} tiles on {gpu.sms} SMs, "
            f"{gpu.bandwidth / 1e12:.1f} TB/s, a launch {gpu.launch_s * 1e6:.1f} us on the host and at least "
            f"{gpu.kernel_s * 1e6:.1f} us on the device, a sync {gpu.sync_s * 1e6:.1f} us")


def table(costed: list[Costed]) -> str:
    lines = ["| op | N | GEMMs | launches | syncs | TFLOP | pass traffic | workspace (× naive's) | "
             + " | ".join(f"{g} predicted / floor" for g in GPUS) + " | target |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(GPUS) + "---|"]
    for c in costed:
        passes = sum(e.bytes for e in c.book.passes()) + sum(e.extra_bytes for e in c.book.gemms())
        cells = [f"{c.predicted(g) * 1e3:.2f} / {c.floor(g) * 1e3:.2f} ms = {c.predicted(g) / c.floor(g):.3f}×"
                 for g in GPUS.values()]
        target = TARGETS.get((c.name, c.n))
        lines.append(f"| {c.name} | {c.n} | {len(c.book.gemms())} | {len(c.book.launches())} | "
                     f"{len(c.book.syncs())} | {c.book.flops / 1e12:.2f} | {passes / 1e9:.2f} GB | "
                     f"{gib(c.book.workspace_bytes)} ({c.book.workspace_bytes / c.naive_workspace:.3f}×) | "
                     + " | ".join(cells) + f" | {f'≤ {target}×' if target else ''} |")
    return "\n".join(lines)


def median_seconds(fn, device: torch.device, rounds: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn``: CUDA events around each call on a GPU, the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_costs(device: torch.device) -> tuple[float, float]:
    """(the host's seconds to issue a small kernel, a synchronisation's round trip) here, by the wall clock:
    1,000 adds of one-element tensors in a row, then 100 each read back (``.item()``), less an add's issue and
    its least device time."""
    x = torch.zeros(1, device=device)

    def per_add(count: int, read: bool) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(count):
            y = x + 1
            if read:
                y.item()
        synchronize(device)
        return (time.perf_counter() - start) / count

    per_add(10, True)
    launch_s = per_add(1000, False)
    return launch_s, max(0.0, per_add(100, True) - launch_s - KERNEL_S)


def copy_rate(device: torch.device) -> float:
    """Bytes/s read and written by a device-to-device copy here (2 GiB on a GPU, 64 MiB on a CPU)."""
    src = torch.empty((1 << 30) if device.type == "cuda" else (1 << 25), device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / median_seconds(lambda: dst.copy_(src), device)


def time_gemm(layout: str, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> float:
    """Median seconds of an [m, k] x [k, n] GEMM into a preallocated output, each operand stored as ``layout``
    reads it ("T": a transposed view), as the hot path hands them to cuBLAS."""
    def operand(transposed: bool, rows: int, cols: int) -> torch.Tensor:
        t = torch.randn((cols, rows) if transposed else (rows, cols), device=device, dtype=dtype)
        return t.T if transposed else t

    a, b = operand(layout[0] == "T", m, k), operand(layout[1] == "T", k, n)
    out = torch.empty(m, n, device=device, dtype=dtype)
    return median_seconds(lambda: torch.mm(a, b, out=out), device)


def gemm_line(shape: tuple[str, int, int, int], seconds: float, dtype: torch.dtype) -> str:
    """A GEMM's measured time and rate beside the model's time at the H100's rates."""
    layout, m, n, k = shape
    traffic = (m * k + k * n + m * n) * dtype.itemsize
    model = H100.seconds(ledger.Entry("gemm", "gemm", 2 * m * n * k, traffic, shape=(m, n, k), layout=layout))
    return (f"| {layout} {m} x {n} x {k} | {seconds * 1e3:.3f} ms | {2 * m * n * k / seconds / 1e12:.0f} | "
            f"{model * 1e3:.3f} ms |")


def plan_gemms(costed: list[Costed]) -> list[tuple[str, int, int, int]]:
    """The distinct GEMMs (layout, m, n, k) the ops and their floors launch, in the order first launched."""
    shapes = [(e.layout, *e.shape) for c in costed for book in (c.book, c.floor_book) for e in book.gemms()]
    return list(dict.fromkeys(shapes))


def measure(ns, d: int, v: int, dtype: torch.dtype, ratio: float, device: torch.device) -> None:
    """On ``device``: its bandwidth and host costs; then for each N in turn, each GEMM shape the plan launches
    there timed (those not timed yet), and each op timed beside its prediction at the costs measured here (the
    GEMM rates fitted to the shapes' times). Each line is printed as soon as it is measured, so a run stopped at
    a time limit keeps what it measured, the first N's complete."""
    def say(line: str = "") -> None:
        print(line, flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (a rehearsal of the code path)"
    bandwidth = copy_rate(device)
    launch_s, sync_s = host_costs(device)
    say(f"{name}: copy {bandwidth / 1e12:.2f} TB/s, a small kernel issued in {launch_s * 1e6:.1f} us, a sync "
        f"{sync_s * 1e6:.1f} us (measured)")
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else SMS
    backend = "triton" if device.type == "cuda" else "torch"  # the route timed: on a CPU the rehearsal's
    timed = {}
    for n in ns:
        costed = cost_ops(n, d, v, dtype, ratio)
        say(f"\nN={n}, D={d}, V={v}, {dtype}\n")
        say("| GEMM (layout, m x n x k) | measured | TFLOP/s | model at H100's rates |\n|---|---|---|---|")
        for shape in plan_gemms(costed):
            if shape not in timed:
                timed[shape] = time_gemm(*shape, dtype, device)
                say(gemm_line(shape, timed[shape], dtype))
        by_layout = {}
        for shape, seconds in timed.items():
            shapes, total = by_layout.get(shape[0], ((), 0.0))
            by_layout[shape[0]] = (shapes + (shape,), total + seconds)
        here = ledger.GPU(calibrated(by_layout.values(), sms), bandwidth, sms, TILE, launch_s, KERNEL_S, sync_s)
        say(f"\nFitted here: {describe(here)}\n")
        say("| op | N | measured | predicted here | measured / predicted | floor predicted here | measured / floor |"
            "\n|---|---|---|---|---|---|---|")
        targets, cu, mask = (t.to(device) for t in inputs(n, d, v, dtype, ratio)[2:])
        hidden = torch.randn(n, d, device=device).to(dtype).requires_grad_()
        weight = (torch.randn(v, d, device=device) * 0.02).to(dtype).requires_grad_()
        for op, (fn, _, _) in op_calls(hidden, weight, targets, cu, mask, backend).items():
            c = next(c for c in costed if c.name == op)
            seconds, predicted, floor = median_seconds(fn, device), c.predicted(here), c.floor(here)
            say(f"| {op} | {n} | {seconds * 1e3:.2f} ms | {predicted * 1e3:.2f} ms | {seconds / predicted:.2f}× | "
                f"{floor * 1e3:.2f} ms | {seconds / floor:.2f}× |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=list(NS), help="rows (tokens); several give a row each")
    parser.add_argument("--d", type=int, default=HEADLINE["d"])
    parser.add_argument("--v", type=int, default=HEADLINE["v"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ratio", type=float, default=0.3, help="share of tokens the selective loss keeps")
    parser.add_argument("--measure", action="store_true", help="time each GEMM shape and op beside its prediction")
    parser.add_argument("--device", default="cuda", help="where --measure times (cpu: a rehearsal of the code path)")
    parser.add_argument("--world", type=int, default=0, help="cost a vocabulary-parallel head over this many processes")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.world:
        print(comm_per_call(args.n[0], args.d, args.v, args.world, dtype, args.ratio))
        return
    if args.measure:
        measure(args.n, args.d, args.v, dtype, args.ratio, torch.device(args.device))
        return
    costed = [c for n in args.n for c in cost_ops(n, args.d, args.v, dtype, args.ratio)]
    print(f"Predicted GPU route at D={args.d}, V={args.v}, {args.dtype}, each op against its floor (its unavoidable "
          "GEMMs alone). Costs charged (the H100's GEMM rates fitted to its GEMMs in h100-2026-11-26/RESULTS-cuda.md, "
          "its launch, kernel and sync costs assumed; the H200's GEMMs, copies and launches measured on one, "
          "LEDGER-cuda.md; the tile assumed: benchmarks/ledger.py):\n")
    for gpu_name, gpu in GPUS.items():
        print(f"- {gpu_name}: {describe(gpu)}")
    print("\n" + table(costed))


if __name__ == "__main__":
    main()
