"""The cost ledger: what each op's GPU route launches at a given shape, and the time that predicts, without a GPU.

Every op runs in a dry run (``selpo.kernels.ledger``): its inputs are zero-stride tensors of the real shape
(one row of storage), the schedule plans for CUDA, and each GEMM and memory-bound pass records the FLOPs and
bytes of the tensors it is handed instead of running. The prediction takes a GEMM at the GPU's measured
matmul rate and a pass at its memory bandwidth (``Ledger.predict``); the floor is the op's unavoidable GEMMs
alone at the same rate. The torch and triton backends share the schedule, hence this ledger: only who runs
each pass differs (tests/test_ledger.py checks that both record the same launches).

    python -m benchmarks.ledger                       # headline: bf16, N=16384, D=4096, V=128256, H100 and H200
    python -m benchmarks.ledger --n 16384 --d 576 --v 49152
    python -m benchmarks.ledger --measure             # on a GPU: its ceilings, then each op timed beside its prediction
    python -m benchmarks.ledger --world 8             # a vocabulary-parallel head over 8 processes: what each sends
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from selpo.kernels import ledger, linear_logprobs, linear_selective_loss, token_scores, topk_mask

# Measured rates (bf16 dense matmul through cuBLAS, and memory bandwidth), from DEVELOPERS.md / GPU-NOTES.md.
GPUS = {"H100": (741e12, 3.0e12), "H200": (790e12, 4.3e12)}
HEADLINE = dict(n=16384, d=4096, v=128256)
# Responses of this many tokens, laid out as pairs (chosen then rejected), for the losses and the selection.
RESPONSE_TOKENS = 128


@dataclass
class Costed:
    """One op at one shape: its ledger and its floor (the unavoidable GEMM FLOPs)."""

    name: str
    book: ledger.Ledger
    floor_flops: int
    naive_workspace: int

    def predicted(self, gpu: str) -> float:
        return self.book.predict(*GPUS[gpu])

    def floor(self, gpu: str) -> float:
        return self.floor_flops / GPUS[gpu][0]


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


def dry(fn) -> ledger.Ledger:
    with ledger.counting(dry_run=True, device="cuda") as book:
        fn()
    return book


def op_calls(hidden, weight, targets, cu, mask, backend: str) -> dict:
    """name -> (a call of the op, its floor in multiples of one all-rows GEMM): what the ledger costs and
    ``--measure`` times."""
    n = hidden.shape[0]
    share = float(mask.sum()) / n
    fraction = f"{round(100 * share)}%"

    def forward():
        with torch.no_grad():
            linear_logprobs(hidden, weight, targets, backend=backend)

    def forward_backward():
        logp = linear_logprobs(hidden, weight, targets, backend=backend)
        torch.autograd.grad(logp, (hidden, weight), torch.ones_like(logp))

    def sepo():
        loss, _ = linear_selective_loss(hidden, weight, targets, cu, mask=mask, loss="sepo", backend=backend)
        torch.autograd.grad(loss, (hidden, weight))

    def scores():  # topk_mask then reads the [N] scores once: nothing next to this
        h, w = hidden.detach(), weight.detach()
        token_scores(h, w, h, w, targets, backend=backend)

    return {"linear_logprobs forward": (forward, 1), "linear_logprobs forward+backward": (forward_backward, 4),
            f"SePO loss, {fraction} selected, forward+backward": (sepo, 3 * share), "token_scores": (scores, 2)}


def cost_ops(n: int, d: int, v: int, dtype: torch.dtype = torch.bfloat16, ratio: float = 0.3) -> list[Costed]:
    """The ledger of every op at this shape (torch backend: see the module docstring)."""
    hidden, weight, targets, cu, mask = inputs(n, d, v, dtype, ratio)
    gemm = 2 * n * d * v
    selected = int(mask.sum())
    # Lower bounds of naive's workspace: its forward holds the fp32 logits and their log-softmax (saved for the
    # backward); its backward adds the fp32 gradient of the log-softmax and the half gradient of the logits.
    # (Measured on an H100 at the headline shape: 15.7 GiB forward, 22.4 GiB forward+backward.)
    naive, naive_bwd = 2 * n * v * 4, n * v * (4 + 4 + dtype.itemsize)

    def backward_selected():
        with ledger.counting(dry_run=True, device="cuda"):  # the forward is not part of this measure
            logp = linear_logprobs(hidden, weight, targets, backend="torch")
        torch.autograd.grad(logp, (hidden, weight), mask.float())

    calls = op_calls(hidden, weight, targets, cu, mask, "torch")
    costed = [Costed(name, dry(fn), round(multiple * gemm), naive_bwd if "backward" in name else naive)
              for name, (fn, multiple) in calls.items()]
    costed.insert(2, Costed(f"linear_logprobs backward, {round(100 * selected / n)}% of rows", dry(backward_selected),
                            3 * gemm * selected // n, naive_bwd))
    return costed


def comm_per_call(n: int, d: int, v: int, world: int, dtype: torch.dtype = torch.bfloat16, ratio: float = 0.3) -> str:
    """What one process of a vocabulary-parallel head (``world`` even shards) sends into all-reduces per call,
    beside the bytes of the [N, V] logits that gathering them would move. The shard is planted directly (the
    ledger's dry run has no process group); the collectives are recorded where the ops make them."""
    from selpo.kernels.linear_logprobs import LinearLogprobs
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
        selective_loss_fused(Passes("torch", 1.0, None), hidden.detach(), weight.detach(), None, targets, cu_sel, rows,
                             "sepo", True, None, None, {"gamma": 1.0, "margin": 0.0}, (True, True, False), shard)

    lines = [f"Vocabulary-parallel head over {world} processes (shards of {size} rows), N={n}, D={d}, V={v}: "
             f"bytes each process sends into all-reduces per call (the [N, V] logits in {dtype}: "
             f"{n * v * dtype.itemsize / 1e9:.2f} GB)\n", "| op | all-reduces | bytes |", "|---|---|---|"]
    for name, fn in (("linear_logprobs forward+backward", forward_backward), ("SePO loss, forward+backward", sepo)):
        comm = [e for e in dry(fn).entries if e.kind == "comm"]
        lines.append(f"| {name} | {len(comm)} | {sum(e.bytes for e in comm) / 1e6:.1f} MB |")
    return "\n".join(lines)


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def table(costed: list[Costed]) -> str:
    lines = ["| op | GEMMs | TFLOP | pass traffic | workspace (× naive's) | H100 predicted / floor | "
             "H200 predicted / floor |", "|---|---|---|---|---|---|---|"]
    for c in costed:
        passes = sum(e.bytes for e in c.book.passes()) + sum(e.extra_bytes for e in c.book.gemms())
        cells = [f"{c.predicted(g) * 1e3:.1f} / {c.floor(g) * 1e3:.1f} ms = {c.predicted(g) / c.floor(g):.3f}×"
                 for g in GPUS]
        lines.append(f"| {c.name} | {len(c.book.gemms())} | {c.book.flops / 1e12:.2f} | {passes / 1e9:.2f} GB | "
                     f"{gib(c.book.workspace_bytes)} ({c.book.workspace_bytes / c.naive_workspace:.3f}×) | "
                     f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def cuda_median(fn, rounds: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn`` on the current CUDA device (events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def gemm_rate(n: int, d: int, v: int, dtype: torch.dtype) -> float:
    """FLOP/s of the [n, d] x [d, v] product into a preallocated buffer on this GPU."""
    a = torch.randn(n, d, device="cuda", dtype=dtype)
    b = torch.randn(v, d, device="cuda", dtype=dtype)
    out = torch.empty(n, v, device="cuda", dtype=dtype)
    return 2 * n * d * v / cuda_median(lambda: torch.mm(a, b.T, out=out))


def copy_rate() -> float:
    """Bytes/s read and written by a 2 GiB device-to-device copy on this GPU."""
    src = torch.empty(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / cuda_median(lambda: dst.copy_(src))


def measure(n: int, d: int, v: int, dtype: torch.dtype, ratio: float) -> str:
    """On a GPU: its ceilings, then each op (triton backend) timed beside the ledger's prediction at them."""
    flops, bandwidth = gemm_rate(n, d, v, dtype), copy_rate()
    GPUS["measured"] = (flops, bandwidth)
    costed = {c.name: c for c in cost_ops(n, d, v, dtype, ratio)}
    targets, cu, mask = (t.cuda() for t in inputs(n, d, v, dtype, ratio)[2:])
    hidden = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda") * 0.02).to(dtype).requires_grad_()
    lines = [f"{torch.cuda.get_device_name()}: matmul {flops / 1e12:.0f} TFLOP/s, copy {bandwidth / 1e12:.2f} TB/s "
             f"(measured)\n", "| op | measured | predicted at the measured ceilings | measured / predicted | "
             "measured / floor | peak memory |", "|---|---|---|---|---|---|"]
    for name, (fn, _) in op_calls(hidden, weight, targets, cu, mask, "triton").items():
        torch.cuda.reset_peak_memory_stats()
        seconds = cuda_median(fn)
        c = costed[name]
        predicted, floor = c.predicted("measured"), c.floor("measured")
        lines.append(f"| {name} | {seconds * 1e3:.1f} ms | {predicted * 1e3:.1f} ms | {seconds / predicted:.2f}× | "
                     f"{seconds / floor:.2f}× | {gib(torch.cuda.max_memory_allocated())} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in HEADLINE.items():
        parser.add_argument(f"--{key}", type=int, default=value)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ratio", type=float, default=0.3, help="share of tokens the selective loss keeps")
    parser.add_argument("--measure", action="store_true", help="on a CUDA GPU: time each op beside its prediction")
    parser.add_argument("--world", type=int, default=0, help="cost a vocabulary-parallel head over this many processes")
    args = parser.parse_args(argv)
    if args.world:
        print(comm_per_call(args.n, args.d, args.v, args.world, getattr(torch, args.dtype), args.ratio))
        return
    if args.measure:
        print(measure(args.n, args.d, args.v, getattr(torch, args.dtype), args.ratio))
        return
    costed = cost_ops(args.n, args.d, args.v, getattr(torch, args.dtype), args.ratio)
    print(f"Predicted GPU route at N={args.n}, D={args.d}, V={args.v}, {args.dtype} (rates: "
          + ", ".join(f"{g} {f / 1e12:.0f} TFLOP/s, {b / 1e12:.1f} TB/s" for g, (f, b) in GPUS.items()) + ")\n")
    print(table(costed))


if __name__ == "__main__":
    main()
