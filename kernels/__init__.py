"""selpo.kernels: fused token-level ops for preference optimization.

Every op takes a flat, packed layout (N tokens; segments given by int32 ``cu_seqlens`` [S+1]) and a
``backend=`` keyword; see ``selpo.kernels.backend``.
"""

from .linear_logprobs import linear_logprobs
from .logits_logprobs import logprobs_from_logits
from .losses import dpo_loss, mean_lengths, plackett_luce_loss, sepo_loss, sequence_scores, simpo_loss, weighted_nll
from .segment_sum import segment_sum
from .selective_loss import linear_selective_loss
from .token_scores import token_scores
from .topk_mask import topk_mask

__all__ = ["dpo_loss", "linear_logprobs", "linear_selective_loss", "logprobs_from_logits", "mean_lengths",
           "plackett_luce_loss", "segment_sum", "sepo_loss", "sequence_scores", "simpo_loss",
           "token_scores", "topk_mask", "weighted_nll"]
