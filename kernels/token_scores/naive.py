"""Naive reference: the full logits of both models."""

from ..linear_logprobs.naive import linear_logprobs_naive


def token_scores_naive(hidden_a, weight_a, hidden_b, weight_b, targets, ignore_index=-100):
    return (linear_logprobs_naive(hidden_a, weight_a, targets, ignore_index=ignore_index)
            - linear_logprobs_naive(hidden_b, weight_b, targets, ignore_index=ignore_index))
