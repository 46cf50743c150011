"""Scoring a dataset for SePO: per-token scores of two models (oracle minus reference log-prob) and the top 30%
of each response (the bottom 30% of a rejected one). selpo's ``token_scores`` + ``topk_mask`` against the naive
way (two full-logit passes, then a per-response Python loop that picks tokens one argmax at a time, as the SePO
authors' released scoring script does) and a vectorized baseline (the same passes, then one torch.topk)."""

from __future__ import annotations

import torch

from selpo.kernels.linear_logprobs.naive import linear_logprobs_naive
from selpo.kernels.token_scores import token_scores
from selpo.kernels.topk_mask import topk_mask

from .harness import Impl, Step, floor_step, max_error, require_cuda_for_triton
from .inputs import select_count

NAME = "token_scores_topk"
MODES = {"select": "scores of two models and top-30% selection per response"}


def select_step(case, x, select_fn) -> Step:
    """The Step of ``select_fn(inputs) -> (scores [N], mask [N])``, without autograd."""
    x.model_b()  # drawn now with the other inputs, never inside a measured run

    def timed():
        with torch.no_grad():
            scores, mask = select_fn(x)
        return {"scores": scores, "mask": mask}
    return Step(timed=timed)


def op(make):
    return lambda case, x: select_step(case, x, make(case))


def selpo(backend):
    def make(case):
        require_cuda_for_triton(backend, case.device)

        def select(x):
            hidden_b, weight_b = x.model_b()
            scores = token_scores(x.hidden, x.weight, hidden_b, weight_b, x.targets, backend=backend)
            return scores, topk_mask(scores, x.cu_seqlens, case.ratio, largest=x.largest, backend=backend)
        return select
    return make


def full_logit_scores(x) -> torch.Tensor:
    """Both models' log-probs from their full logits (two passes): the scores of the naive ways."""
    hidden_b, weight_b = x.model_b()
    return linear_logprobs_naive(x.hidden, x.weight, x.targets) - linear_logprobs_naive(hidden_b, weight_b, x.targets)


def naive_loop(x):
    scores = full_logit_scores(x)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    bounds, largest = x.cu_seqlens.tolist(), x.largest.tolist()
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        key = scores[start:end].clone() if largest[s] else -scores[start:end]
        for _ in range(select_count(x.case.ratio, end - start)):
            i = int(key.argmax())
            mask[start + i] = True
            key[i] = -float("inf")
    return scores, mask


def topk_vectorized(x):
    """The responses all have the case's length, so the scores are a [responses, length] matrix."""
    scores = full_logit_scores(x)
    by_response = scores.view(x.num_segments, -1)
    key = torch.where(x.largest[:, None], by_response, -by_response)
    picked = key.topk(select_count(x.case.ratio, by_response.shape[1]), dim=1).indices
    return scores, torch.zeros_like(key, dtype=torch.bool).scatter_(1, picked, True).view(-1)


def floor(case, x) -> Step:
    return floor_step([(x.hidden, x.weight), x.model_b()], ("logits",))


IMPLS = [
    Impl("selpo-torch", "selpo token_scores + topk_mask, torch backend", op(selpo("torch")), role="selpo"),
    Impl("selpo-triton", "selpo token_scores + topk_mask, triton backend", op(selpo("triton")), role="selpo"),
    Impl("naive-loop", "naive: full logits, per-response argmax loop", op(lambda case: naive_loop),
         role="baseline", dense=4),
    Impl("topk", "full logits, vectorized torch.topk", op(lambda case: topk_vectorized), dense=4),
    Impl("floor", "matmuls alone (the floor)", floor, role="floor", dense=2),
]


def impls(case) -> list[Impl]:
    return IMPLS


def input_bytes(case, x) -> int:
    return x.nbytes("hidden", "weight", "targets", "cu_seqlens", "largest") + sum(t.nbytes for t in x.model_b())


def kept_bytes(case, x) -> int:
    """The float32 scores and the bool mask."""
    return 5 * case.n


def expected(case, x, ref) -> dict:
    return {"scores": ref.memo("scores", lambda: ref.logp("a") - ref.logp("b"))}


def error(outputs, expect, case, x) -> float:
    """The scores' error, or, if larger, how far the mask is from a true top-k of the float64 scores: each
    response must select exactly k tokens, none scoring worse than a token left out by more than the error
    returned (relative to the largest |score|); a wrong count is an infinite error."""
    err = max_error(outputs, expect)
    mask, ref = outputs["mask"], expect["scores"]
    if mask.dtype != torch.bool or mask.shape != ref.shape:
        return float("inf")
    by_response = ref.view(x.num_segments, -1)
    key = torch.where(x.largest[:, None], by_response, -by_response)
    picked = mask.view(x.num_segments, -1)
    if bool((picked.sum(1) != select_count(case.ratio, by_response.shape[1])).any()):
        return float("inf")
    worst_picked = torch.where(picked, key, torch.inf).amin(1)
    best_left = torch.where(picked, -torch.inf, key).amax(1)
    return max(err, float((best_left - worst_picked).clamp(min=0).max() / ref.abs().max()))
