"""The machinery every benchmark case shares: what a case and an implementation are, the check against
float64, peak memory measured for real on each device, the matmul floor, and the records the report reads.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU, tensor
memory is invisible to Python's tracemalloc, so each (case, implementation) runs in a fresh subprocess
(``benchmarks.probe``) that reads its own peak resident set (VmHWM): it builds the inputs, runs the step
once to warm up, frees what that left, resets the high-water mark (``/proc/self/clear_refs``), then runs the
step again. In both cases the measured number is the peak *above* the state before the step, when only the
inputs exist; ``peak`` adds the inputs back and ``workspace`` removes the outputs and gradients that every
implementation must return, leaving what the implementation needs on top.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from selpo.kernels import ledger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Largest accepted max|out - ref| / max|ref| against float64 math on the same (already rounded) inputs.
TOL = {"float32": 1e-4, "bfloat16": 3e-2}


class Unavailable(Exception):
    """Raised while building an implementation that cannot run here; the message is the reason reported."""


@dataclass(frozen=True)
class Case:
    """One computation at one shape, dtype and device, timed ``rounds`` times after ``warmup`` rounds
    (the correctness run before them is a warmup too). ``impls`` restricts the family's implementations (a
    sweep point runs a few); those in ``skip`` are reported as left out of the plan, to keep it short.
    ``paired_impl`` is selpo's implementation that answers the case's targets: in its test, each one in
    ``paired`` is timed again, alternating with it, ``paired_rounds`` rounds each (their ratios are the targets')."""

    family: str
    mode: str
    n: int
    d: int
    v: int
    dtype: str
    device: str
    rounds: int
    warmup: int = 0
    seg_len: int = 128
    ratio: float = 0.3
    impls: tuple = ()
    skip: tuple = ()
    paired_impl: str = ""
    paired: tuple = ()
    paired_rounds: int = 0

    @property
    def id(self) -> str:
        return f"{self.family}-{self.mode}-N{self.n}-D{self.d}-V{self.v}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Case":
        fields = json.loads(text)
        for name in ("impls", "skip", "paired"):
            fields[name] = tuple(fields[name])
        return cls(**fields)


@dataclass
class Step:
    """What an implementation runs for a case. ``clear`` drops what the last run left (gradients, a pending
    graph); ``before`` is untimed work of a round after clearing (the forward of a backward-only case);
    ``timed`` is the measured work and returns the outputs that are checked against float64."""

    timed: Callable[[], dict]
    clear: Callable[[], None] = lambda: None
    before: Callable[[], None] = lambda: None

    def prepare(self) -> None:
        self.clear()
        self.before()

    def run(self) -> dict:
        self.prepare()
        return self.timed()


@dataclass(frozen=True)
class Impl:
    """One implementation in a family: ``build(case, inputs)`` returns its Step or raises Unavailable.

    ``role``: "selpo" (ours: an error fails the suite), "baseline" (naive, what ratios are taken to), "peer"
    or "floor" (the matmuls alone). ``dense``: how many [N, V] float32 buffers it holds at its peak in a
    forward+backward, to skip it (as n/a) where that would not fit the memory budget.
    """

    key: str
    label: str
    build: Callable[[Case, object], Step]
    role: str = "peer"
    dense: float = 0.0


def require_cuda_for_triton(backend: str, device: str) -> None:
    """selpo's Triton backend is benchmarked only where it compiles: on a CUDA GPU."""
    if backend == "triton" and device != "cuda":
        raise Unavailable("selpo's Triton kernels need a CUDA GPU (on CPU they run only in Triton's "
                          "interpreter, which the tests use)")


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Fresh leaves sharing the tensors' storage, with gradients on."""
    return [t.detach().requires_grad_() for t in tensors]


def floor_step(pairs, products) -> Step:
    """The N x D x V matmuls an op over these (rows [n, D], weight [V, D]) pairs cannot avoid, alone:
    ``products``, in order and with repeats, among "logits" (rows @ weight.T), "grad_hidden" (G @ weight) and
    "grad_weight" (G.T @ rows), each written into a preallocated buffer. G holds random values (never
    denormals) for a backward alone."""
    bufs = []
    for rows, weight in pairs:
        logits = torch.randn(rows.shape[0], weight.shape[0], dtype=rows.dtype, device=rows.device)
        bufs.append((rows, weight, logits, torch.empty_like(rows), torch.empty_like(weight)))

    def timed():
        for rows, weight, logits, grad_rows, grad_weight in bufs:
            for product in products:
                if product == "logits":
                    torch.mm(rows, weight.T, out=logits)
                elif product == "grad_hidden":
                    torch.mm(logits, weight, out=grad_rows)
                else:
                    torch.mm(logits.T, rows, out=grad_weight)
        return {}

    return Step(timed=timed)


def max_error(outputs: dict, expected: dict) -> float:
    """Largest max|out - ref| / max|ref| over the expected outputs; inf for a missing or misshapen one,
    NaN where an output holds NaN."""
    worst = 0.0
    for name, ref in expected.items():
        out = outputs.get(name)
        if out is None or tuple(out.shape) != tuple(ref.shape):
            return float("inf")
        if ref.numel() == 0:
            continue
        out, ref = out.detach().to(ref.device, torch.float64), ref.to(torch.float64)
        err = float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        if err != err:
            return err
        worst = max(worst, err)
    return worst


def output_error(outputs: dict, expected: dict, case: Case, inputs) -> float:
    """A family's ``error``: max_error of its outputs (families with more to check define their own)."""
    return max_error(outputs, expected)


def bytes_of(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_run(run: Callable[[], object], device: str) -> tuple[float, int]:
    """(seconds ``run`` takes, the GPU synchronised around it; on CUDA the most it allocates above what was
    allocated before it, else 0)."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) if cuda else 0


# ---- peak memory ----

def _status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{name}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_high_water_mark() -> bool:
    """Resets VmHWM to the current resident set (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(step: Step, device: str) -> dict:
    """Peak bytes of one run of ``step`` above the memory held before it, in this process.

    Returns {"extra": bytes, "warm": bool}; "warm" is False on a CPU kernel that cannot reset the high-water
    mark, where the measured run is the process's first (one-time costs, compilation included, count)."""
    if device == "cuda":
        step.run()
        step.clear()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        outputs = step.run()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        del outputs
        step.clear()
        return {"extra": extra, "warm": True}
    warm = _reset_high_water_mark()
    if warm:
        step.run()
        step.clear()
        ledger.release_buffers()  # selpo's kept work buffers are workspace: the measured run allocates them again
        gc.collect()
        _reset_high_water_mark()
    base = _status_kib("VmRSS")
    outputs = step.run()
    extra = (_status_kib("VmHWM") - base) * 1024
    del outputs
    return {"extra": extra, "warm": warm}


def probe_memory(case: Case, impl_key: str, timeout_s: float = 1800) -> dict:
    """``measure_peak`` of (case, impl) in a fresh Python process (the CPU measurement); raises on failure.

    Allocations of 64 KiB and more are mmap'ed there (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the
    resident set at once instead of staying in malloc's heap to be reused unseen by the next run."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.probe", case.to_json(), impl_key], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory?)" if proc.returncode == -9 else f"exit code {proc.returncode}"
        raise RuntimeError(f"memory probe {why}: {proc.stderr.strip()[-400:]}")
    return json.loads(lines[-1][len("PROBE "):])


# ---- records ----

@dataclass
class Record:
    """One row of the report: a (case, implementation) and what was measured, or why it was not."""

    case: dict
    case_id: str
    impl: str
    label: str
    role: str
    status: str = "ok"  # "ok", "n/a" (cannot run here: reason) or "error" (raised: reason)
    reason: str = ""
    correct: bool | None = None
    error: float | None = None
    tol: float | None = None
    median_s: float | None = None
    iqr_s: float | None = None
    min_s: float | None = None
    rounds: int | None = None
    peak_bytes: int | None = None
    workspace_bytes: int | None = None
    memory_note: str = ""
    wall_s: float | None = None
    # For selpo's implementations: {other impl: {"median_s": ours, "other_median_s": theirs, "rounds": n}},
    # timed in alternation (Case.paired), or {other impl: {"reason": why not}}.
    paired: dict = field(default_factory=dict)

    def append_to(self, path: str) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(asdict(self)) + "\n")


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
