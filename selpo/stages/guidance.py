"""Stage ``guidance``: token-level guidance's first reward model (``selpo.reward_model``), trained on a seeded
share of the training pairs, each pair a ranking of two (Bradley-Terry). Its retraining during the policy's
training belongs to the method (``selpo.methods.guidance.Alternation``)."""

from __future__ import annotations

from ..batches import Example
from ..context import Context
from ..data import seeded_subset
from ..methods.guidance import ranking_objective
from ..trainer import read_metrics, train
from .pipeline import fingerprint


def run(ctx: Context) -> dict:
    cfg, run_cfg = ctx.config.guidance, ctx.config
    pairs = ctx.pairs("train")
    chosen = seeded_subset(len(pairs), cfg.fraction, run_cfg.seed)
    model, tokenizer = ctx.load_reward_model(run_cfg.model, head=cfg.head)
    out = ctx.stage_dir("guidance")
    train(ctx.accelerator, model, tokenizer, ranking_objective(ctx), [Example(pairs[i]) for i in chosen], cfg, out,
          seed=run_cfg.seed, fingerprint=fingerprint(run_cfg, "guidance"))
    return {"pairs": len(chosen), **read_metrics(out)[-1]}
