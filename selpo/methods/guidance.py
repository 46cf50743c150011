"""Preference-grounded token-level guidance (arXiv 2306.00398): the two losses of its alternation.

- ``TokenRewardRanking`` trains the reward model (``selpo.reward_model``): the token rewards of each
  sequence are aggregated into one score, and the scores of K ranked sequences get a Plackett-Luce loss
  (Bradley-Terry for a preference pair).
- ``RewardWeightedLikelihood`` trains the language model on the preferred responses (batches of them
  alone, as rankings of one), each token weighted by its reward normalised over its response
  (``extras["weights"]``, see ``reward_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import linear_selective_loss, mean_lengths, plackett_luce_loss, sequence_scores
from ..logprobs import response_states
from ..reward_model import token_rewards

SCALED = ("avg", "softmax", "softmin")  # aggregations scaled by the mean length C of the compared sequences


@dataclass
class TokenRewardRanking:
    """Plackett-Luce loss of the aggregated token rewards of K ranked responses per prompt (batches from
    pairs, K = 2, or from ``TokenizedRanking`` examples)."""

    aggregation: str = "softmax"
    temperature: float = 2.0
    backend: str = "auto"

    def loss(self, model, batch):
        pairs = batch.pairs
        rewards = token_rewards(model, pairs)
        groups = pairs.num_pairs
        scale = mean_lengths(pairs.cu_seqlens, groups) if self.aggregation in SCALED else None
        scores = sequence_scores(rewards, pairs.cu_seqlens, aggregation=self.aggregation,
                                 temperature=self.temperature, scale=scale, backend=self.backend)
        return plackett_luce_loss(scores, groups)


@dataclass
class RewardWeightedLikelihood:
    """``-sum_t w_t log p(y_t)`` over each response of the batch, averaged over the responses."""

    backend: str = "auto"

    def loss(self, model, batch):
        pairs = batch.pairs
        hidden, head = response_states(model, pairs)
        return linear_selective_loss(hidden, head.weight, pairs.targets, pairs.cu_seqlens, loss="weighted_nll",
                                     weights=batch.extras["weights"], backend=self.backend, **head.op_kwargs())


@torch.no_grad()
def reward_weights(rewards: torch.Tensor) -> torch.Tensor:
    """The weights w_t = r_t / sum r of one response's token rewards (float32)."""
    rewards = rewards.float()
    return rewards / rewards.sum()
