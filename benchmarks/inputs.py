"""The tensors of one shape, drawn from fixed seeds, so that a memory probe in another process rebuilds exactly
the inputs the timed and checked runs saw."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from selpo.kernels.topk_mask import topk_mask

from .harness import Case, bytes_of


def select_count(ratio: float, n: int) -> int:
    """k = max(1, floor(ratio * n)) in exact arithmetic on the decimal ``ratio`` (0.3 of 10 tokens is 3)."""
    return max(1, math.floor(Fraction(str(ratio)) * n))


class Inputs:
    """Packed pairs of equal-length responses: ``hidden`` [N, D], ``weight`` [V, D] (logits of standard
    deviation ~2, like a trained head's), ``targets`` [N], an upstream gradient ``grad`` [N] of the log-probs,
    ``cu_seqlens`` for chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1} (``segment_ids`` [N] the same as
    one id per token, ``largest`` [S] True for chosen responses), the SePO ``mask`` [N] of the top ``ratio`` of
    each response by a random token score (selpo's topk_mask), and ``grad_masked`` = grad on those rows only.
    ``model_b()`` is a second model (the reference for token scores), drawn on first use."""

    def __init__(self, case: Case, seed: int = 0):
        n, d, v, dev = case.n, case.d, case.v, case.device
        if n % (2 * case.seg_len):
            raise ValueError(f"N={n} must be a whole number of pairs of {case.seg_len}-token responses")
        self.case = case
        self.seed = seed
        gen = torch.Generator(device=dev).manual_seed(seed)
        self.hidden = torch.randn(n, d, generator=gen, device=dev).to(case.torch_dtype)
        self.weight = (torch.randn(v, d, generator=gen, device=dev) * (2 / math.sqrt(d))).to(case.torch_dtype)
        self.targets = torch.randint(0, v, (n,), generator=gen, device=dev)
        self.grad = torch.randn(n, generator=gen, device=dev)
        segments = n // case.seg_len
        self.num_segments = segments
        self.cu_seqlens = torch.arange(0, n + 1, case.seg_len, dtype=torch.int32, device=dev)
        self.segment_ids = torch.arange(segments, device=dev).repeat_interleave(case.seg_len)
        self.largest = torch.arange(segments, device=dev) < segments // 2
        token_scores = torch.randn(n, generator=gen, device=dev)
        self.mask = topk_mask(token_scores, self.cu_seqlens, case.ratio, largest=self.largest, backend="torch")
        self.grad_masked = self.grad * self.mask
        self._model_b = None

    def model_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden_b [N, D], weight_b [V, D]): a second model over the same tokens and vocabulary."""
        if self._model_b is None:
            case = self.case
            gen = torch.Generator(device=case.device).manual_seed(self.seed + 1)
            hidden = torch.randn(case.n, case.d, generator=gen, device=case.device).to(case.torch_dtype)
            weight = torch.randn(case.v, case.d, generator=gen, device=case.device) * (2 / math.sqrt(case.d))
            self._model_b = (hidden, weight.to(case.torch_dtype))
        return self._model_b

    def nbytes(self, *names: str) -> int:
        return bytes_of(*(getattr(self, name) for name in names))
