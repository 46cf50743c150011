"""Stage ``train``: the policy trained with SePO's loss on the key tokens selected by the ``score`` stage.

The policy is a fresh copy of the initial model, or ``train.policy``: any model sharing the data's
tokenizer, e.g. a larger one supervised by a small oracle. No reference model is needed.
"""

from __future__ import annotations

from ..methods import SePO
from ..models import load_causal_lm, load_tokenizer
from ..trainer import read_metrics, train
from .pipeline import Context, fingerprint
from .score import load_scored, selected_examples


def check_same_tokenizer(policy_tokenizer, data_tokenizer, policy: str) -> None:
    """The pairs were tokenized for the run's model; a policy must read the same ids the same way."""
    if policy_tokenizer.get_vocab() != data_tokenizer.get_vocab():
        raise ValueError(f"train.policy: {policy!r} has a different tokenizer than the run's model, so it cannot "
                         "be trained on the tokenized and scored pairs; use a model of the same family")


def run(ctx: Context) -> dict:
    cfg, run_cfg = ctx.config.train, ctx.config
    policy = cfg.policy or run_cfg.model
    model, tokenizer = load_causal_lm(policy, device=ctx.accelerator.device)
    if cfg.policy is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(run_cfg.model), cfg.policy)
    examples = selected_examples(load_scored(ctx))
    out = ctx.stage_dir("train")
    train(ctx.accelerator, model, tokenizer, SePO(gamma=cfg.gamma, margin=cfg.margin, backend=run_cfg.backend),
          examples, cfg, out, seed=run_cfg.seed, fingerprint=fingerprint(run_cfg, "train"))
    return {"pairs": len(examples), "policy": policy, **read_metrics(out)[-1]}

