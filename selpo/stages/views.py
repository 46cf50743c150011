"""Each method's view of a few training pairs, token by token: the score or weight it gives each response
token and whether its loss reads the token. The eval stage writes them (``eval/tokens.jsonl``); the report
and ``selpo compare`` draw them as heatmaps.

- sepo: the oracle's reward log p_oracle - log p_initial; the key tokens of the score stage.
- selective_dpo: log p_ref - log p_policy (chosen) or its negative (rejected) under the trained policy;
  the tokens ``train.selective_rule`` keeps of each response, as at its last step.
- guidance: the final reward model's token rewards r_t; the loss reads the chosen responses only.
- dpo, simpo: the trained policy's log-ratio log p_policy - log p_initial; every token is read.
"""

from __future__ import annotations

import json

import torch

from ..methods import selection_scores, selective_mask
from ..reward_model import load_reward_model, pair_rewards
from .pipeline import Context
from .score import load_scored
from .store import pair_row

SELECTING = ("sepo", "selective_dpo")  # the methods whose loss reads a chosen subset of the tokens

LEGENDS = {
    "sepo": "the oracle's reward log p<sub>oracle</sub> - log p<sub>initial</sub>; outlined: the selected key tokens "
            "(highest rewards in chosen responses, lowest in rejected ones)",
    "selective_dpo": "log p<sub>ref</sub> - log p<sub>policy</sub> in chosen responses, its negative in rejected ones, "
                     "under the trained policy; outlined: the tokens DPO's loss keeps (the highest scores)",
    "guidance": "the reward model's token reward r<sub>t</sub> in (0, 1); outlined: the tokens the weighted "
                "likelihood reads (the chosen response, weights r<sub>t</sub> / sum r)",
    "dpo": "the trained policy's log-ratio log p<sub>policy</sub> - log p<sub>initial</sub>; every token is trained",
    "simpo": "the trained policy's log-ratio log p<sub>policy</sub> - log p<sub>initial</sub>; every token is trained",
}


def _row(pair, scores, masks) -> dict:
    return pair_row(pair, chosen_scores=scores[0], rejected_scores=scores[1], chosen_mask=masks[0],
                    rejected_mask=masks[1])


def _selective(ctx: Context, pair, policy, oracle) -> dict:
    logps, ref = torch.cat(policy), torch.cat(oracle)
    cu = torch.tensor([0, len(policy[0]), len(logps)], dtype=torch.int32)
    scores = selection_scores(logps, ref, cu)
    train = ctx.config.train
    mask = selective_mask(scores, cu, train.selective_ratio, train.selective_rule, ctx.config.backend)
    n = len(policy[0])
    return _row(pair, (scores[:n].tolist(), scores[n:].tolist()), (mask[:n].int().tolist(), mask[n:].int().tolist()))


def _rewards(ctx: Context, pairs) -> list:
    """The token rewards of the reward model the policy's training ended with."""
    summary = json.loads((ctx.stage_dir("train") / "DONE.json").read_text())["summary"]
    model, _ = load_reward_model(summary["reward_model"], device=ctx.accelerator.device)
    return pair_rewards(ctx.accelerator, model, pairs, batch_size=ctx.config.eval.batch_size)


def token_views(ctx: Context, pairs, policy_logps, initial_logps, oracle_logps) -> list[dict]:
    """One row per pair: its tokens, ``{chosen,rejected}_scores`` and 0/1 ``{chosen,rejected}_mask``."""
    method = ctx.config.method
    if method == "sepo":
        return load_scored(ctx)[:len(pairs)]
    if method == "selective_dpo":
        return [_selective(ctx, p, pol, ora) for p, pol, ora in zip(pairs, policy_logps, oracle_logps)]
    if method == "guidance":
        return [_row(p, (c.tolist(), r.tolist()), ([1] * len(c), [0] * len(r)))
                for p, (c, r) in zip(pairs, _rewards(ctx, pairs))]
    return [_row(p, ((pc - ic).tolist(), (pr - ir).tolist()), ([1] * len(pc), [1] * len(pr)))
            for p, (pc, pr), (ic, ir) in zip(pairs, policy_logps, initial_logps)]
