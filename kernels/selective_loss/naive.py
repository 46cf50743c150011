"""Naive reference of the selective loss: log-probs of every token from full logits, then the loss's full
function over the selected tokens."""

from ..linear_logprobs.naive import linear_logprobs_naive


def selective_loss_naive(loss, hidden, weight, targets, cu_seqlens, selected, inputs, options, bias, ignore_index,
                         temperature, softcap):
    """(loss, metrics) of the registered ``loss`` (a ``FusedLoss``), inputs and options checked."""
    logps = linear_logprobs_naive(hidden, weight, targets, bias, ignore_index, temperature, softcap)
    return loss.full(logps, cu_seqlens, selected, "naive", **inputs, **options)
