"""The hot path's schedule, shared by every backend: GEMM tiles of logits in one reused buffer (``plan``,
``launch``) and memory-bound passes over each tile (``passes``: PyTorch ops on CPU, Triton kernels on CUDA).

Two routines use it: ``logprobs`` (per-row log-probs and their gradients, for ``linear_logprobs`` and
``token_scores``) and ``fused_loss`` (the selective loss with its gradients formed in the forward).
"""
