"""Which implementation of an op runs: Triton kernels, the PyTorch path, or the naive reference.

Every public op takes ``backend=``:

* ``"auto"`` (default): Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``
  (Triton's interpreter); the PyTorch path otherwise. The environment variable
  ``SELPO_BACKEND`` replaces ``"auto"`` by a fixed choice.
* ``"triton"``, ``"torch"``, ``"naive"``: that implementation, whatever the device.
"""

from __future__ import annotations

import os

import torch

from . import ledger

BACKENDS = ("auto", "triton", "torch", "naive")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("triton", "torch" or "naive") for tensors on ``device`` (in a dry run, the device
    type it models: ``ledger.route_device``)."""
    device = ledger.route_device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("SELPO_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"environment variable SELPO_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend == "triton" and device.type == "cpu" and not triton_interpreted():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
        return backend
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return "triton"
    return "torch"


def triton_interpreted() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
