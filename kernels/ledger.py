"""What each launch of the hot path costs, recorded from the tensors it is handed, and a dry run that costs a
shape without allocating it.

Every GEMM and every memory-bound pass of ``selpo.kernels.streaming`` calls ``record_gemm`` or ``record_pass``
with the very tensors (or views) it reads and writes, so the FLOPs and bytes follow from their shapes and
dtypes, never from a typed-in constant: a design that reads a buffer twice shows it twice. Big buffers come
from ``workspace``, which adds up their bytes.

Under ``counting(dry_run=True)`` nothing is computed: launchers record and return, Triton kernels are not
launched, and ``workspace`` hands out zero-stride views of one row, so the headline shape (16k x 4k hidden
states, a 128k x 4k head) is costed in a fraction of a second on a CPU. ``dry_input`` makes such inputs.

With ``launches=True`` such a dry run on CPU tensors also stands in for the host side of the device it models:
every other kernel the call would launch there (the small torch ops, Triton kernels outside the passes) and
every host synchronisation is recorded in order among the GEMMs and passes (``Launches``), so that
``Ledger.predict`` can lay the call on a timeline of host and device (``GPU``). The counts come from the code
that runs, never from a table, so they follow its changes.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary


@dataclass
class Entry:
    """One launch: a GEMM (``flops`` > 0), a memory-bound pass, another kernel ("launch"), a host synchronisation
    ("sync", no bytes) or a collective ("comm"), and the bytes it reads and writes (a collective: the bytes of
    the tensor it reduces).

    ``extra_bytes`` is what a GEMM moves beyond a plain GEMM into a fresh output: the accumulator it reads
    back when it adds into its output. ``shape`` is a GEMM's (m, n, k) and ``layout`` how it reads its two
    operands, "N" as stored or "T" transposed: the forward's h @ w.T is "NT", dz.T @ h "TN", dz @ w "NN"."""

    name: str
    kind: str
    flops: int
    bytes: int
    extra_bytes: int = 0
    shape: tuple[int, ...] = ()
    layout: str = ""


def tiles(m: int, n: int, tile: tuple[int, int]) -> int:
    """Output tiles of an [m, n] GEMM result, a partial tile counting whole."""
    return -(-m // tile[0]) * -(-n // tile[1])


@dataclass(frozen=True)
class GPU:
    """What a GPU charges for a ledger's entries (the values and their sources: benchmarks/ledger.py).

    ``rates``: a GEMM's FLOP/s per layout when its tiles fill whole waves; ``sms`` and ``tile``: the
    multiprocessors and a GEMM's output tile, so that a GEMM takes ceil(tiles / sms) whole waves (``wave_flops``);
    ``bandwidth``: bytes/s of a pass or of a GEMM's traffic; ``launch_s``: the host's time to issue one kernel;
    ``kernel_s``: the least device time of one kernel; ``sync_s``: a host synchronisation's round trip once the
    device has drained."""

    rates: dict[str, float]
    bandwidth: float
    sms: int
    tile: tuple[int, int]
    launch_s: float
    kernel_s: float
    sync_s: float

    def wave_flops(self, m: int, n: int, k: int) -> int:
        """The FLOPs of the whole waves of tiles an [m, k] x [k, n] GEMM takes: its cost at a full-wave rate.
        With fewer tiles than multiprocessors, k is split among them (split-K, as cuBLAS does for such shapes)."""
        count = tiles(m, n, self.tile)
        split = max(1, self.sms // count)
        return -(-count * split // self.sms) * self.sms * 2 * self.tile[0] * self.tile[1] * -(-k // split)

    def seconds(self, e: Entry) -> float:
        """Device time of one kernel: a GEMM at the slower of its whole waves at its layout's rate and its traffic
        at the bandwidth (an accumulator it reads back comes on top), anything else at the bandwidth; at least
        ``kernel_s``."""
        if e.kind == "gemm":
            busy = max(self.wave_flops(*e.shape) / self.rates[e.layout], (e.bytes - e.extra_bytes) / self.bandwidth)
            return max(self.kernel_s, busy + e.extra_bytes / self.bandwidth)
        return max(self.kernel_s, e.bytes / self.bandwidth)


@dataclass
class Ledger:
    """The launches of a block of code, and its workspace: ``workspace_bytes`` is the most alive at once
    (buffers live until the end of the ``scoped`` routine that made them), ``buffers`` each one's
    (shape, dtype). ``count_launches``: every kernel and host synchronisation is recorded too."""

    dry_run: bool = False
    device: str | None = None
    count_launches: bool = False
    entries: list[Entry] = field(default_factory=list)
    buffers: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    workspace_bytes: int = 0
    live_bytes: int = 0

    def gemms(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "gemm"]

    def passes(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "pass"]

    def launches(self) -> list[Entry]:
        """Every kernel launch: GEMMs, passes and the rest."""
        return [e for e in self.entries if e.kind in ("gemm", "pass", "launch")]

    def syncs(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "sync"]

    @property
    def flops(self) -> int:
        return sum(e.flops for e in self.entries)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def predict(self, gpu: GPU) -> float:
        """Seconds on ``gpu``, on a timeline of two queues: the host issues the kernels in order, ``launch_s``
        each, and the device runs each once it is issued and the previous one is done; a sync holds the host
        until the device has drained, then ``sync_s``. So launches cost time where the device waits for them
        (after a sync, or when the kernels are shorter than their issue), and hide behind long GEMMs."""
        host = device = 0.0
        for e in self.entries:
            if e.kind == "sync":
                host = max(host, device) + gpu.sync_s
            elif e.kind != "comm":
                host += gpu.launch_s
                device = max(device, host) + gpu.seconds(e)
        return max(host, device)


_stack: list[Ledger] = []
# Above zero while the ledger makes a dry run's stand-ins (``dry_input``): ops no kernel of the real run makes.
_standing_in = 0


@contextlib.contextmanager
def standing_in():
    """Ops made within the block are the ledger's own stand-ins, not launches of the call it counts."""
    global _standing_in
    _standing_in += 1
    try:
        yield
    finally:
        _standing_in -= 1


@contextlib.contextmanager
def counting(dry_run: bool = False, device: str | None = None, launches: bool = False):
    """Records every launch made inside the block into the yielded Ledger; ``dry_run`` skips the work, and
    ``device`` ("cuda") makes the schedule plan for that device type whatever the tensors' own (and, in a dry
    run, take its route: see ``route_device``). ``launches`` (a dry run only: in a real one the GEMMs and passes
    would count twice) records every other kernel and every host synchronisation too (``Launches``)."""
    if launches and not dry_run:
        raise ValueError("counting(launches=True) needs dry_run=True: a real run's GEMMs and passes would count twice")
    ledger = Ledger(dry_run=dry_run, device=device, count_launches=launches)
    _stack.append(ledger)
    try:
        with contextlib.ExitStack() as stack:
            if dry_run:
                stack.enter_context(triton_skipped())
            if launches:
                stack.enter_context(Launches(ledger))
            yield ledger
    finally:
        _stack.pop()


def record_launch(name: str, tensors=()) -> None:
    """A kernel other than a GEMM or a pass, reading and writing ``tensors`` (each counted once), when the
    innermost ledger counts launches."""
    if _stack and _stack[-1].count_launches:
        seen = {id(t): t for t in tensors if isinstance(t, torch.Tensor)}
        _stack[-1].entries.append(Entry(name, "launch", 0, sum(map(nbytes, seen.values()))))


def record_sync(name: str) -> None:
    """A host synchronisation, when the innermost ledger counts launches."""
    if _stack and _stack[-1].count_launches:
        _stack[-1].entries.append(Entry(name, "sync", 0, 0))


@contextlib.contextmanager
def triton_skipped():
    """Within the block a Triton kernel launched in a dry run runs not, and is recorded as a launch; outside a
    dry run it runs. (Every Triton kernel is launched as ``kernel[grid](...)``, through ``KernelInterface``.)"""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:  # no Triton: no Triton kernel to skip
        yield
        return
    getitem = KernelInterface.__getitem__

    def launcher(kernel, grid):
        if executing():
            return getitem(kernel, grid)
        return lambda *args, **kwargs: record_launch(f"triton {kernel.__name__}", (*args, *kwargs.values()))

    KernelInterface.__getitem__ = launcher
    try:
        yield
    finally:
        KernelInterface.__getitem__ = getitem


# aten ops that hand a device value to the host, which waits for the device (as tests/test_syncs.py counts them).
SYNCING = {"nonzero", "_local_scalar_dense", "equal", "masked_select", "_unique2"}
# aten ops that launch no kernel: allocations, and the read of one value (its wait is a sync).
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_local_scalar_dense"}


class Launches(TorchDispatchMode):
    """Records into ``book`` what a CPU run standing in for a GPU would launch and wait for there, in order.

    Every tensor is taken as a device tensor except those made from host data (``torch.tensor`` of Python
    values, an aten ``lift_fresh``) and what ops make from those alone: such ops run on the host. A host tensor
    reaching the device is a copy that synchronises: ``.to`` naming a device, ``torch.tensor(..., device=)``, or
    one used in an op with device tensors (``.to(..., non_blocking=True)`` is a copy on the stream instead, the
    host not waiting). ``tolist`` of a device tensor is a sync too (PyTorch does not
    dispatch it), as are ``SYNCING``'s ops. Each other op on device tensors is a kernel launch, except views and
    ``NO_KERNEL``'s. A factory op (``torch.zeros(...)``) is taken as a launch on the device: a CPU run cannot
    tell the device it names from the host."""

    def __init__(self, book: Ledger):
        super().__init__()
        self.book, self.host, self.patches = book, WeakTensorKeyDictionary(), contextlib.ExitStack()

    def active(self) -> bool:
        """Whether this book is the innermost (an inner ``counting`` records its own) and not making stand-ins."""
        return _stack[-1] is self.book and not _standing_in

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.active():
            return out
        name = func.overloadpacket.__name__
        ins = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name.startswith("lift_fresh") or (ins and all(t in self.host for t in ins)):
            for t in outs:
                self.host[t] = True
            return out
        if any(t in self.host and t.dim() for t in ins):
            record_sync(f"host-to-device copy into {name}")
        if name in SYNCING:
            record_sync(name)
        if not (func.is_view or name in NO_KERNEL):
            record_launch(name, ins + outs)
        return out

    def to_device(self, t: torch.Tensor, name: str, blocking: bool = True) -> torch.Tensor:
        """``t``, made on the host, copied to the device: a sync (a copy on the stream if not ``blocking``), and a
        device tensor (an alias of ``t``, which stays on the host)."""
        if blocking:
            record_sync(f"host-to-device copy ({name})")
        else:
            record_launch(f"host-to-device copy ({name})", (t,))
        with standing_in():
            return t.view_as(t)

    def __enter__(self):
        launches = self

        def patch(owner, name, make):
            original = getattr(owner, name)
            setattr(owner, name, functools.wraps(original)(make(original)))
            self.patches.callback(setattr, owner, name, original)

        def to(original):
            def wrapper(t, *args, **kwargs):
                out = original(t, *args, **kwargs)
                named = kwargs.get("device") is not None or any(
                    isinstance(a, (torch.device, str)) or (isinstance(a, torch.Tensor) and a not in launches.host)
                    for a in args)
                if t in launches.host and named and launches.active():
                    return launches.to_device(out, "to", not kwargs.get("non_blocking", False))
                return out
            return wrapper

        def made(original):
            def wrapper(*args, **kwargs):
                out = original(*args, **kwargs)
                if kwargs.get("device") is not None and out in launches.host and launches.active():
                    return launches.to_device(out, original.__name__)
                return out
            return wrapper

        def tolist(original):
            inside = []  # a torch-function mode (a default device) calls the patched method again from within

            def wrapper(t):
                if not inside and t not in launches.host and launches.active():
                    record_sync("tolist")
                inside.append(t)
                try:
                    return original(t)
                finally:
                    inside.pop()
            return wrapper

        patch(torch.Tensor, "to", to)
        patch(torch.Tensor, "tolist", tolist)
        patch(torch, "tensor", made)
        patch(torch, "as_tensor", made)
        return super().__enter__()

    def __exit__(self, *exc):
        self.patches.close()
        return super().__exit__(*exc)


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


def route_device(device: torch.device) -> torch.device:
    """The device whose route a call takes (its backend): inside a dry run that models a device type, that one,
    as nothing runs there, Triton kernels included; so a dry run on a CPU costs CUDA's route. Else ``device``."""
    if _stack and _stack[-1].dry_run and _stack[-1].device:
        return torch.device(_stack[-1].device)
    return device


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes a kernel touches in ``t`` (a view counts its own elements only)."""
    return 0 if t is None else t.numel() * t.element_size()


def layout(t: torch.Tensor) -> str:
    """How a GEMM reads a 2-D operand: "T" when its rows are contiguous rather than its columns (a transposed
    view; a dry run's zero row stride reads as such too), else "N"."""
    return "T" if t.stride(-1) != 1 and t.shape[-1] != 1 else "N"


def record_gemm(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out (+)= a @ b with a [m, k], b [k, n]: 2mkn FLOPs."""
    if _stack:
        m, k = a.shape
        n = b.shape[1]
        read_back = nbytes(out) if accumulate else 0
        _stack[-1].entries.append(Entry(name, "gemm", 2 * m * k * n, nbytes(a) + nbytes(b) + nbytes(out) + read_back,
                                        read_back, (m, n, k), layout(a) + layout(b)))


def record_pass(name: str, reads: tuple = (), writes: tuple = ()) -> None:
    """A memory-bound pass reading and writing these tensors (views: the elements it touches)."""
    if _stack:
        _stack[-1].entries.append(Entry(name, "pass", 0, sum(map(nbytes, reads)) + sum(map(nbytes, writes))))


def record_comm(name: str, t: torch.Tensor) -> None:
    """A collective over ``t`` (its bytes, as each process sends them in)."""
    if _stack:
        _stack[-1].entries.append(Entry(name, "comm", 0, nbytes(t)))


def dry_input(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor of ``shape`` backed by one row (row stride 0): what a dry run hands the ops, and its stand-in
    for what a skipped launch returns (no launch of its own)."""
    with standing_in():
        return torch.zeros(shape[-1] if shape else (), dtype=dtype, device=device).as_strided(
            shape, (0,) * (len(shape) - 1) + (1,) * bool(shape))


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
        return dry_input(tuple(size), dtype, device)
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
