"""Selective-DPO (arXiv 2507.07725): DPO on the tokens where a strong reference and the current policy
disagree most, chosen afresh at every step.

Per response, every token is scored from the policy's own log-probs of this forward pass (no second
forward): ``log p_ref - log p_policy`` in a chosen response, ``log p_policy - log p_ref`` in a rejected
one; the top ``ratio`` of each response are kept (``selective_mask``: exactly k tokens, or the released
code's quantile rule) and DPO's loss reads only those, with the reference's
log-probs on the same tokens. The reference is frozen, so its log-probs are computed once before
training (``extras["ref_logps"]``, see ``with_reference_logps``). The backward of the log-probs touches
only the kept tokens (the others get a zero gradient, which ``linear_logprobs`` skips).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch

from ..kernels import dpo_loss, linear_logprobs, segment_sum, topk_mask
from ..logprobs import response_states
from ..options import option, require
from .base import Method, Prepared, view_row
from .dpo import DPOOptions, reference_examples
from .oracle import ORACLE

RULES = ("topk", "quantile")


@dataclass
class SelectiveDPOOptions:
    """Selective-DPO (method "selective_dpo"): DPO on the tokens its strong reference (the oracle) picks at every
    step."""

    SECTION: typing.ClassVar[str] = "selective_dpo"
    beta: float = option(DPOOptions.beta, "DPO's KL strength beta.")
    ratio: float = option(0.4, "Share of each response's tokens kept at every step (the highest scores).")
    rule: str = option("topk", "The selection: topk (exactly max(1, floor(ratio * n)) tokens, ties to the earlier "
                       "position) or quantile (the released code: every token scoring >= the (1 - ratio) quantile of "
                       "its response, linear interpolation, i.e. floor(ratio * n + 1 - ratio) tokens plus all ties "
                       "at the threshold; the released code also drops tokens whose policy log-prob is exactly 0.0 "
                       "as if padding, an artefact of its padded layout that selpo's packed layout does not need, "
                       "so they are kept).")

    def __post_init__(self):
        s = self.SECTION
        require(s, "beta", math.isfinite(self.beta) and self.beta > 0, f"must be > 0, got {self.beta}")
        require(s, "ratio", 0 < self.ratio <= 1, f"must lie in (0, 1], got {self.ratio}")
        require(s, "rule", self.rule in RULES, f"must be one of {RULES}, got {self.rule!r}")


def selection_scores(logps: torch.Tensor, ref_logps: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N] Selective-DPO's token scores: ref - policy on chosen responses (the first half of the segments),
    policy - ref on rejected ones. Detached: the selection is not differentiated."""
    split = int(cu_seqlens[(cu_seqlens.shape[0] - 1) // 2])
    gap = (ref_logps.float() - logps.detach().float())
    return torch.cat([gap[:split], -gap[split:]])


def quantile_mask(scores: torch.Tensor, cu_seqlens: torch.Tensor, ratio: float) -> torch.Tensor:
    """bool [N]: per segment, the tokens scoring >= its (1 - ratio) quantile (linear interpolation), as the
    released Selective-DPO code keeps them: floor(ratio * n + 1 - ratio) tokens plus every tie at the threshold.

    Its other rule, dropping tokens whose policy log-prob is exactly 0.0 as padding, is not applied: in the
    packed layout there is no padding, and a certain token (log-prob 0, common in bf16) is a real token.
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            segment = scores[start:end].float()
            mask[start:end] = segment >= torch.quantile(segment, 1 - ratio)
    return mask


def selective_mask(scores: torch.Tensor, cu_seqlens: torch.Tensor, ratio: float, rule: str = "topk",
                   backend: str = "auto") -> torch.Tensor:
    """The tokens Selective-DPO keeps: ``topk`` (max(1, floor(ratio * n)) per segment, ties to the earlier
    position) or ``quantile`` (``quantile_mask``)."""
    if rule == "quantile":
        return quantile_mask(scores, cu_seqlens, ratio)
    if rule != "topk":
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return topk_mask(scores, cu_seqlens, ratio, largest=True, backend=backend)


@dataclass
class SelectiveDPO:
    """``-logsigmoid(beta * (sum over kept chosen tokens - over kept rejected tokens of log p - log p_ref))``."""

    beta: float = SelectiveDPOOptions.beta
    ratio: float = SelectiveDPOOptions.ratio
    rule: str = SelectiveDPOOptions.rule
    backend: str = "auto"

    def loss(self, model, batch):
        pairs, ref_logps = batch.pairs, batch.extras["ref_logps"]
        hidden, head = response_states(model, pairs)
        logps = linear_logprobs(hidden, head.weight, pairs.targets, backend=self.backend, **head.op_kwargs())
        scores = selection_scores(logps, ref_logps, pairs.cu_seqlens)
        mask = selective_mask(scores, pairs.cu_seqlens, self.ratio, self.rule, self.backend)
        loss, metrics = dpo_loss(logps, ref_logps, pairs.cu_seqlens, beta=self.beta, mask=mask, backend=self.backend)
        kept = segment_sum(mask.float(), pairs.cu_seqlens, backend=self.backend)
        return loss, {**metrics, "selected": kept}


class SelectiveDPOMethod(Method):
    name = "selective_dpo"
    title = "Selective-DPO"
    options = SelectiveDPOOptions
    stages = (ORACLE,)
    strength = "selective_dpo.beta"
    grid = (0.1, 0.5)
    selects = True
    legend = ("log p<sub>ref</sub> - log p<sub>policy</sub> in chosen responses, its negative in rejected ones, "
              "under the trained policy; outlined: the tokens DPO's loss keeps (the highest scores)")

    def prepare(self, ctx, policy, tokenizer, key):
        """The strong reference is the DPO-trained oracle; its log-probs are computed once, then it is let go."""
        reference, _ = ctx.load_causal_lm(ctx.model_path("oracle"))
        examples = reference_examples(ctx, reference, tokenizer)
        del reference
        cfg = ctx.config.selective_dpo
        objective = SelectiveDPO(beta=cfg.beta, ratio=cfg.ratio, rule=cfg.rule, backend=ctx.config.backend)
        return Prepared(objective, examples)

    def token_view(self, ctx, pairs, logps):
        """The scores under the trained policy, and the tokens ``selective_dpo.rule`` keeps, as at its last step."""
        cfg = ctx.config.selective_dpo
        rows = []
        for pair, policy, oracle in zip(pairs, logps.policy, logps.oracle):
            n = len(policy[0])
            cu = torch.tensor([0, n, n + len(policy[1])], dtype=torch.int32)
            scores = selection_scores(torch.cat(policy), torch.cat(oracle), cu)
            mask = selective_mask(scores, cu, cfg.ratio, cfg.rule, ctx.config.backend)
            rows.append(view_row(pair, (scores[:n].tolist(), scores[n:].tolist()),
                                 (mask[:n].int().tolist(), mask[n:].int().tolist())))
        return rows
