"""What each launch of the hot path costs, recorded from the tensors it is handed, and a dry run that costs a
shape without allocating it.

Every GEMM and every memory-bound pass of ``selpo.kernels.streaming`` calls ``record_gemm`` or ``record_pass``
with the very tensors (or views) it reads and writes, so the FLOPs and bytes follow from their shapes and
dtypes, never from a typed-in constant: a design that reads a buffer twice shows it twice. Big buffers come
from ``workspace``, which adds up their bytes.

Under ``counting(dry_run=True)`` nothing is computed: launchers record and return, and ``workspace`` hands
out zero-stride views of one row, so the headline shape (16k x 4k hidden states, a 128k x 4k head) is
costed in a fraction of a second on a CPU. ``dry_input`` makes such inputs.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field

import torch


@dataclass
class Entry:
    """One launch: a GEMM (``flops`` > 0), a memory-bound pass or a collective ("comm"), and the bytes it reads
    and writes (a collective: the bytes of the tensor it reduces).

    ``extra_bytes`` is what a GEMM moves beyond a plain GEMM into a fresh output: the accumulator it reads
    back when it adds into its output."""

    name: str
    kind: str
    flops: int
    bytes: int
    extra_bytes: int = 0


@dataclass
class Ledger:
    """The launches of a block of code, and its workspace: ``workspace_bytes`` is the most alive at once
    (buffers live until the end of the ``scoped`` routine that made them), ``buffers`` each one's
    (shape, dtype)."""

    dry_run: bool = False
    device: str | None = None
    entries: list[Entry] = field(default_factory=list)
    buffers: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    workspace_bytes: int = 0
    live_bytes: int = 0

    def gemms(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "gemm"]

    def passes(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "pass"]

    @property
    def flops(self) -> int:
        return sum(e.flops for e in self.entries)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    @property
    def comm_bytes(self) -> int:
        """Bytes sent into collectives (all-reduces of a vocabulary-parallel head), left out of ``predict``."""
        return sum(e.bytes for e in self.entries if e.kind == "comm")

    def predict(self, flops_per_s: float, bytes_per_s: float) -> float:
        """Seconds at a GPU's measured rates: a GEMM at the slower of its arithmetic at the matmul rate and
        its traffic at the bandwidth (an accumulator it reads back comes on top), a pass at the bandwidth."""
        return sum(max(e.flops / flops_per_s, (e.bytes - e.extra_bytes) / bytes_per_s) + e.extra_bytes / bytes_per_s
                   for e in self.entries if e.kind != "comm")


_stack: list[Ledger] = []


@contextlib.contextmanager
def counting(dry_run: bool = False, device: str | None = None):
    """Records every launch made inside the block into the yielded Ledger; ``dry_run`` skips the work, and
    ``device`` ("cuda") makes the schedule plan for that device type whatever the tensors' own."""
    ledger = Ledger(dry_run=dry_run, device=device)
    _stack.append(ledger)
    try:
        yield ledger
    finally:
        _stack.pop()


def scoped(fn):
    """Marks a routine whose work buffers are freed when it returns (for the workspace's peak)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        live = _stack[-1].live_bytes if _stack else 0
        try:
            return fn(*args, **kwargs)
        finally:
            if _stack:
                _stack[-1].live_bytes = live
    return wrapper


def executing() -> bool:
    """False inside a dry run: launchers record and return without computing."""
    return not (_stack and _stack[-1].dry_run)


def modeled_device(device: torch.device) -> str:
    """The device type the schedule plans for: the ledger's ``device`` if it sets one, else the tensors'."""
    return _stack[-1].device if _stack and _stack[-1].device else torch.device(device).type


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes a kernel touches in ``t`` (a view counts its own elements only)."""
    return 0 if t is None else t.numel() * t.element_size()


def record_gemm(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out (+)= a @ b with a [m, k], b [k, n]: 2mkn FLOPs."""
    if _stack:
        m, k = a.shape
        n = b.shape[1]
        read_back = nbytes(out) if accumulate else 0
        _stack[-1].entries.append(Entry(name, "gemm", 2 * m * k * n, nbytes(a) + nbytes(b) + nbytes(out) + read_back,
                                        read_back))


def record_pass(name: str, reads: tuple = (), writes: tuple = ()) -> None:
    """A memory-bound pass reading and writing these tensors (views: the elements it touches)."""
    if _stack:
        _stack[-1].entries.append(Entry(name, "pass", 0, sum(map(nbytes, reads)) + sum(map(nbytes, writes))))


def record_comm(name: str, t: torch.Tensor) -> None:
    """A collective over ``t`` (its bytes, as each process sends them in)."""
    if _stack:
        _stack[-1].entries.append(Entry(name, "comm", 0, nbytes(t)))


def dry_input(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor of ``shape`` backed by one row (row stride 0): what a dry run hands the ops."""
    return torch.zeros(shape[-1], dtype=dtype, device=device).as_strided(shape, (0,) * (len(shape) - 1) + (1,))


_kept: dict[tuple, torch.Tensor] = {}


def release_buffers() -> None:
    """Frees the work buffers kept between calls on a CPU (see ``workspace``); the next call allocates them again."""
    _kept.clear()


def workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, fill: float | None = None,
              output: bool = False, name: str | None = None):
    """A work buffer of the hot path, counted in the ledger's workspace (an ``output`` is not); a fill is a
    pass. A zero-stride view in a dry run.

    A ``name``d buffer on a CPU is kept between calls (per thread, grown as needed) and handed out again: the
    C allocator returns big blocks to the system on free, and touching fresh pages again on every call costs
    about a tenth of a GEMM-bound step. CUDA's caching allocator already reuses device memory. They stay
    allocated until ``release_buffers()``."""
    size = torch.Size(shape)
    if _stack:
        book = _stack[-1]
        elsize = torch.empty((), dtype=dtype).element_size()
        if not output:
            book.buffers.append((tuple(size), dtype))
            book.live_bytes += size.numel() * elsize
            book.workspace_bytes = max(book.workspace_bytes, book.live_bytes)
        if fill is not None:
            _stack[-1].entries.append(Entry("fill", "pass", 0, size.numel() * elsize))
    if not executing():
        return dry_input(tuple(size), dtype, device) if len(size) else torch.zeros((), dtype=dtype, device=device)
    if name is not None and torch.device(device).type == "cpu":
        key = (name, dtype, threading.get_ident())
        kept = _kept.get(key)
        if kept is None or kept.numel() < size.numel():
            kept = _kept[key] = torch.empty(size.numel(), dtype=dtype)
        out = kept[:size.numel()].view(size)
        return out if fill is None else out.fill_(fill)
    if fill is None:
        return torch.empty(size, dtype=dtype, device=device)
    return torch.full(size, fill, dtype=dtype, device=device)
