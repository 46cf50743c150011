"""selpo: fused Triton kernels and a thin trainer for token-level preference optimization."""

__version__ = "0.1.0"
