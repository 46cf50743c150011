"""Naive reference of the selective loss: log-probs of every token from full logits, then the masked loss."""

from ..linear_logprobs.naive import linear_logprobs_naive
from .losses import apply_loss


def selective_loss_naive(hidden, weight, targets, cu_seqlens, selected, name, ref_logps, weights, bias,
                         ignore_index, temperature, softcap, options):
    logps = linear_logprobs_naive(hidden, weight, targets, bias, ignore_index, temperature, softcap)
    return apply_loss(name, logps, cu_seqlens, selected, ref_logps, weights, "naive", options)
