"""What an ML engineer would use instead of selpo, each made by a small function that raises Unavailable,
with the reason, where it cannot run. Peer packages are imported inside, so a missing one is reported as
n/a rather than breaking the suite (they come with ``pip install -e '.[bench]'``)."""

from __future__ import annotations

import os
import shutil

import torch
import torch.nn.functional as F

import selpo

from .harness import Unavailable

INSTALL = "pip install -e '.[bench]'"


def require_compiler(device: str) -> None:
    """torch.compile generates C++ on CPU (Triton on GPU, which comes with torch)."""
    if device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise Unavailable("torch.compile on CPU needs a C++ compiler, and none was found")


def compiled(fn, device: str):
    """``torch.compile(fn)`` with default options, as a user would write it."""
    require_compiler(device)
    return torch.compile(fn)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` (trl/trainer/utils.py, as used by its GRPO and DPO trainers), copied
    rather than pulling in trl and its dependencies: per-token log-probs from materialized logits [B, T, V],
    looping over the batch to bound the peak of the log-softmax; half logits go through log_softmax because
    logsumexp is unstable in bfloat16."""
    if logits.dtype in (torch.float32, torch.float64):
        selected_logits = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        logsumexp_values = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
        return selected_logits - logsumexp_values
    per_token_logps = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)
        per_token_logps.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(per_token_logps)


def trl_logprobs(seg_len: int):
    """Logits materialized in the model's dtype as [responses, seg_len, V], then TRL's selective_log_softmax."""
    def logp(hidden, weight, targets):
        logits = (hidden @ weight.T).view(-1, seg_len, weight.shape[0])
        return selective_log_softmax(logits, targets.view(-1, seg_len)).reshape(-1)
    return logp


def cce_logprobs(impl: str, device: str):
    """Cut Cross-Entropy's per-token output: ``-linear_cross_entropy(..., reduction="none", impl=impl)``."""
    if impl == "cce" and device != "cuda":
        raise Unavailable("Cut Cross-Entropy's cce implementation is Triton kernels for CUDA GPUs")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Unavailable(f"cut-cross-entropy is not installed ({INSTALL}): {e}") from e
    if impl == "torch_compile":
        require_compiler(device)

    def logp(hidden, weight, targets):
        return -linear_cross_entropy(hidden, weight, targets, reduction="none", impl=impl)
    return logp


def liger_logprobs(device: str):
    """Liger-Kernel's fused linear cross-entropy, per token:
    ``-liger_fused_linear_cross_entropy(..., reduction="none")``."""
    if device != "cuda":
        raise Unavailable("Liger's fused linear cross-entropy is a Triton kernel for CUDA GPUs; its chunked "
                          "losses, which run on CPU, are preference losses (see the selective-loss case)")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise Unavailable(f"liger-kernel is not installed ({INSTALL}): {e}") from e

    def logp(hidden, weight, targets):
        return -liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")
    return logp


def liger_sepo_loss(seg_len: int, device: str, gamma: float = 1.0, margin: float = 0.0):
    """Liger-Kernel's chunked SimPO loss (``liger_kernel.chunked_loss``, torch.compile'd, runs on CPU too) made
    SePO's: SimPO's ``-logsigmoid(beta * (mean logp_chosen - mean logp_rejected) - gamma)`` is SePO's loss with
    beta = gamma and gamma = margin once the unselected tokens carry ignore_index, which Liger leaves out of
    the means. It still computes the logits of every token of each chunk of pairs."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel is not installed ({INSTALL}): {e}") from e
    require_compiler(device)
    simpo = LigerFusedLinearSimPOLoss(beta=gamma, gamma=margin, compute_nll_loss=False)

    def loss(hidden, weight, x):
        targets = torch.where(x.mask, x.targets, -100).view(-1, seg_len)
        return simpo(weight, hidden.view(-1, seg_len, hidden.shape[1]), targets)[0]
    return loss


def trl_chunked_logprobs():
    """TRL's fused head (``trl.kernels.ChunkedLogProbFunction``, which TRL 1.16's trainers use for their log-probs)
    called as ``add_fused_lm_head`` calls it: its vocabulary tile width, temperature 1, no softcap, logit scale 1, no
    bias, log-probs only. Targets of -100 leave their rows out of the head (log-prob 0), as TRL does on a Triton
    device; on CPU TRL itself scores every row, so the selected-only variant is a stronger peer than TRL there."""
    # pytest puts the repository root back on sys.path when it collects the suite; its kernels/ folder would then
    # hide the Hugging Face `kernels` package that transformers imports with TRL (selpo/__init__.py).
    selpo._unshadow_kernels()
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError as e:
        raise Unavailable(f"TRL's fused head (trl>=1.16, {INSTALL}) cannot be imported: {e}") from e

    def head(hidden, weight, targets):
        return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None,
                                            1.0, ("log_probs",))[0]

    def logp(hidden, weight, targets):
        keep = targets != -100
        if bool(keep.all()):
            return head(hidden, weight, targets)
        return hidden.new_zeros(targets.shape, dtype=torch.float32).masked_scatter(
            keep, head(hidden[keep], weight, targets[keep]))
    return logp
