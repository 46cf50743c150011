"""Stage ``score``: SePO's token rewards and key tokens for every training pair.

The reward of a response token is ``log p_oracle - log p_initial`` (``token_scores``, one pass over both
models' hidden states, no logits kept; two ``linear_logprobs`` calls when a head has a bias or a logit
transform, which ``token_scores`` does not take). Per response, ``topk_mask`` keeps the key tokens: the highest
rewards of a chosen response (``score.chosen_ratio`` of its tokens) and the lowest of a rejected one
(``score.rejected_ratio``). Scores and masks are saved with the pairs in ``score/scored.jsonl``, which
SePO's training reads and the report displays.

``score.rule = "released"`` follows the authors' code instead (``released_candidates``, ``released_counts``):
their scores are sliced from the prompt length, so the first response token is never selectable, and k is their
Python ``int(float(ratio) * (n - 1))``, a float64 product truncated: for a few (ratio, n) the product lands just
below an integer and k is one less than the exact floor ``"paper"`` uses (ratio 0.58 of a 51-token response:
``int(0.58 * 50)`` = 28, not 29). Where k is 0 their loss is 0/0 = NaN, and selpo keeps one token (a one-token
response keeps its only token). A response that ``data.max_length`` cut has its last token replaced by EOS
before scoring, as their code does; under ``"paper"`` it ends where it was cut.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from accelerate import Accelerator

from .. import lora
from ..batches import split_packed
from ..body import layout_of
from ..context import Context, pair_row, write_jsonl
from ..data import TokenizedPair, collate_pairs
from ..data.packing import PADDED
from ..distributed import map_batches
from ..kernels import linear_logprobs, token_scores, topk_mask
from ..logprobs import response_states
from ..methods.sepo import SCORE_RULES
from ..models import resolve_model_path


def released_candidates(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """bool [N]: the tokens the released SePO code can select: all but the first of each response (of a
    one-token response, that token)."""
    valid = torch.ones(n, dtype=torch.bool, device=cu_seqlens.device)
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff()
    valid[starts[lengths > 1]] = False
    return valid


def released_counts(cu_seqlens: torch.Tensor, ratio: float) -> torch.Tensor:
    """int64 [S]: k of each response under the released rule, ``max(1, int(float(ratio) * n))`` of its n
    ``released_candidates`` (0 for an empty segment): their float64 product, truncated, not an exact floor."""
    lengths = cu_seqlens.diff().long()
    n = torch.where(lengths > 1, lengths - 1, lengths)
    k = (n.to(torch.float64) * float(ratio)).long()
    return torch.where(n > 0, k.clamp(min=1), 0)


def with_eos(pair: TokenizedPair, eos_id: int) -> TokenizedPair:
    """The pair with the last token of each response that was cut replaced by ``eos_id`` (released rule)."""
    chosen, rejected = (ids[:-1] + [eos_id] if cut else ids for ids, cut in zip(pair.responses, pair.cut))
    return dataclasses.replace(pair, chosen_ids=chosen, rejected_ids=rejected)


def select(scores: torch.Tensor, cu_seqlens: torch.Tensor, chosen_ratio: float, rejected_ratio: float,
           backend: str = "auto", rule: str = "paper") -> torch.Tensor:
    """bool [N]: per chosen response its top ``chosen_ratio`` scores, per rejected one its bottom ``rejected_ratio``,
    among every token (``rule="paper"``) or ``released_candidates``, counted by ``released_counts``
    (``"released"``)."""
    if rule not in SCORE_RULES:
        raise ValueError(f"rule must be one of {SCORE_RULES}, got {rule!r}")
    num_pairs = (cu_seqlens.shape[0] - 1) // 2
    split = int(cu_seqlens[num_pairs])
    sides = ((slice(None, split), cu_seqlens[:num_pairs + 1], chosen_ratio, True),
             (slice(split, None), cu_seqlens[num_pairs:] - split, rejected_ratio, False))
    if rule == "paper":
        return torch.cat([topk_mask(scores[part], cu, ratio, largest=largest, backend=backend)
                          for part, cu, ratio, largest in sides])
    valid = released_candidates(cu_seqlens, scores.shape[0])
    return torch.cat([topk_mask(scores[part], cu, counts=released_counts(cu, ratio), largest=largest,
                                valid=valid[part], backend=backend) for part, cu, ratio, largest in sides])


@torch.no_grad()
def score_pairs(accelerator: Accelerator, oracle, reference, pairs: list[TokenizedPair], *, pad_id: int,
                batch_size: int, chosen_ratio: float, rejected_ratio: float, backend: str = "auto",
                rule: str = "paper") -> list:
    """Per pair, ((chosen scores, rejected scores), (chosen mask, rejected mask)) as CPU tensors.

    Sharded over the processes by whole batches, so every pair is scored in the same batch as on one process.
    The body runs in the layout chosen for both models (``selpo.body.layout_of``), padded if they differ.
    ``reference`` may be ``oracle`` itself, a LoRA adapter on the initial model (``selpo.lora``): the reference is
    then its base, the same weights with the adapter disabled.
    """
    oracle.eval()
    reference.eval()
    as_reference = lora.adapter_disabled if reference is oracle else contextlib.nullcontext
    layout = layout_of(oracle) if layout_of(oracle) == layout_of(reference) else PADDED

    def score(chunk: list[TokenizedPair]):
        batch = collate_pairs(chunk, pad_id, layout).to(accelerator.device)
        with accelerator.autocast():
            h_oracle, oracle_head = response_states(oracle, batch)
            with as_reference(reference):
                h_ref, ref_head = response_states(reference, batch)
        # Rewards are ranked, so they are computed in float32 (bf16 rounding would make ties).
        h_oracle, h_ref = h_oracle.float(), h_ref.float()
        oracle_head, ref_head = oracle_head.to(torch.float32), ref_head.to(torch.float32)
        if oracle_head.plain and ref_head.plain:
            scores = token_scores(h_oracle, oracle_head.weight, h_ref, ref_head.weight, batch.targets, backend=backend)
        else:  # token_scores takes no output bias, scale or soft-cap
            scores = (linear_logprobs(h_oracle, oracle_head.weight, batch.targets, backend=backend,
                                      **oracle_head.op_kwargs())
                      - linear_logprobs(h_ref, ref_head.weight, batch.targets, backend=backend, **ref_head.op_kwargs()))
        mask = select(scores, batch.cu_seqlens, chosen_ratio, rejected_ratio, backend, rule)
        cu = batch.cu_seqlens.cpu()
        return list(zip(split_packed(scores.cpu(), cu), split_packed(mask.cpu(), cu)))

    return map_batches(accelerator, pairs, batch_size, score, desc="scoring tokens")


def run(ctx: Context) -> dict:
    cfg, run_cfg = ctx.config.score, ctx.config
    pairs = ctx.pairs("train")
    oracle, tokenizer = ctx.load_causal_lm(ctx.model_path("oracle"))
    if cfg.rule == "released":
        pairs = [with_eos(p, tokenizer.eos_token_id) for p in pairs]
    # A LoRA oracle on the initial model is its own reference (its base): no second copy of the model is loaded.
    shared = lora.adapts(oracle, resolve_model_path(run_cfg.model))
    reference = oracle if shared else ctx.load_causal_lm(run_cfg.model)[0]
    scored = score_pairs(ctx.accelerator, oracle, reference, pairs, pad_id=tokenizer.pad_token_id,
                         batch_size=cfg.batch_size, chosen_ratio=cfg.chosen_ratio,
                         rejected_ratio=cfg.rejected_ratio, backend=run_cfg.backend, rule=cfg.rule)
    rows = [pair_row(pair, chosen_scores=c_scores.tolist(), rejected_scores=r_scores.tolist(),
                     chosen_mask=c_mask.int().tolist(), rejected_mask=r_mask.int().tolist())
            for pair, ((c_scores, r_scores), (c_mask, r_mask)) in zip(pairs, scored)]
    if ctx.accelerator.is_main_process:
        write_jsonl(ctx.scored_path(), rows)
    tokens = sum(len(r["chosen_mask"]) + len(r["rejected_mask"]) for r in rows)
    selected = sum(sum(r["chosen_mask"]) + sum(r["rejected_mask"]) for r in rows)
    return {"pairs": len(rows), "tokens": tokens, "selected": selected, "selected_share": selected / tokens}

