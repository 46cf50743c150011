"""selpo's benchmark suite: its ops and its hot path against naive PyTorch and the libraries users would pick
instead. Run it with ``python -m benchmarks.run`` from the repository root (see benchmarks/README.md)."""

import selpo  # noqa: F401  first: it keeps the repository's kernels/ from hiding the `kernels` package transformers imports
