"""Stage ``oracle``: DPO training of a copy of the initial model on a random share of the training pairs.

The reference is the initial model itself: its log-probs are computed once, before the copy starts to
learn, so no second model is held in memory during training. The oracle's token reward
``log p_oracle - log p_initial`` then scores the data in the ``score`` stage (SePO), or it serves as the
strong reference (Selective-DPO).
"""

from __future__ import annotations

import json

from ..atomic import write_text_atomic
from ..batches import Example
from ..context import Context
from ..data import seeded_subset
from ..methods import DPO, with_reference_logps
from ..trainer import read_metrics, train
from .pipeline import fingerprint


def run(ctx: Context) -> dict:
    cfg, run_cfg = ctx.config.oracle, ctx.config
    pairs = ctx.pairs("train")
    chosen = seeded_subset(len(pairs), cfg.fraction, run_cfg.seed)
    model, tokenizer = ctx.load_causal_lm(run_cfg.model)
    examples = with_reference_logps(ctx.accelerator, model, [Example(pairs[i]) for i in chosen],
                                    pad_id=tokenizer.pad_token_id, batch_size=cfg.micro_batch_size,
                                    backend=run_cfg.backend)
    out = ctx.stage_dir("oracle")
    if ctx.accelerator.is_main_process:
        write_text_atomic(out / "subset.json", json.dumps([pairs[i].row for i in chosen]))
    train(ctx.accelerator, model, tokenizer, DPO(beta=cfg.beta, backend=run_cfg.backend), examples, cfg, out,
          seed=run_cfg.seed, fingerprint=fingerprint(run_cfg, "oracle"))
    return {"pairs": len(examples), **read_metrics(out)[-1]}
