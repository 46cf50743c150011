"""Stage ``oracle``: DPO training of a copy of the initial model on a random share of the training pairs.

The reference is the initial model itself: its log-probs are computed once, before the copy starts to
learn, so no second model is held in memory during training. The oracle's token reward
``log p_oracle - log p_initial`` then scores the data in the ``score`` stage.
"""

from __future__ import annotations

import json
import math

import numpy as np

from ..atomic import write_text_atomic
from ..examples import Example
from ..methods import DPO, with_reference_logps
from ..models import load_causal_lm
from ..trainer import read_metrics, train
from .data import load_pairs
from .pipeline import Context, fingerprint


def subset(n: int, fraction: float, seed: int) -> list[int]:
    """The sorted indices of the ``ceil(fraction * n)`` pairs the oracle learns from, drawn with ``seed``."""
    k = math.ceil(fraction * n)
    return sorted(np.random.default_rng([seed, n]).permutation(n)[:k].tolist())


def run(ctx: Context) -> dict:
    cfg, run_cfg = ctx.config.oracle, ctx.config
    pairs = load_pairs(ctx, "train")
    chosen = subset(len(pairs), cfg.fraction, run_cfg.seed)
    model, tokenizer = load_causal_lm(run_cfg.model, device=ctx.accelerator.device)
    examples = with_reference_logps(ctx.accelerator, model, [Example(pairs[i]) for i in chosen],
                                    pad_id=tokenizer.pad_token_id, batch_size=cfg.micro_batch_size,
                                    backend=run_cfg.backend)
    out = ctx.stage_dir("oracle")
    if ctx.accelerator.is_main_process:
        write_text_atomic(out / "subset.json", json.dumps([pairs[i].row for i in chosen]))
    train(ctx.accelerator, model, tokenizer, DPO(beta=cfg.beta, backend=run_cfg.backend), examples, cfg, out,
          seed=run_cfg.seed, fingerprint=fingerprint(run_cfg, "oracle"))
    return {"pairs": len(examples), **read_metrics(out)[-1]}

