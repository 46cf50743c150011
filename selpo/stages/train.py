"""Stage ``train``: the policy trained with the run's method on all training pairs.

The policy is a fresh copy of the initial model, or ``train.policy``: any model sharing the data's
tokenizer, e.g. a larger one supervised by a small oracle. What the method brings to the shared loop
(``selpo.trainer``), its objective, its examples and any hook before each step, comes from its
``prepare`` (``selpo.methods``).
"""

from __future__ import annotations

from .. import methods
from ..context import Context
from ..memory import peak_mib, reset_peak
from ..models import load_tokenizer
from ..trainer import read_metrics, train
from .pipeline import fingerprint


def check_same_tokenizer(policy_tokenizer, data_tokenizer, policy: str) -> None:
    """The pairs were tokenized for the run's model; a policy must read the same ids the same way."""
    if policy_tokenizer.get_vocab() != data_tokenizer.get_vocab():
        raise ValueError(f"train.policy: {policy!r} has a different tokenizer than the run's model, so it cannot "
                         "be trained on the tokenized and scored pairs; use a model of the same family")


def run(ctx: Context) -> dict:
    cfg, run_cfg, device = ctx.config.train, ctx.config, ctx.accelerator.device
    method = methods.get(run_cfg.method)
    policy = cfg.policy or run_cfg.model
    model, tokenizer = ctx.load_causal_lm(policy)
    if cfg.policy is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(run_cfg.model), cfg.policy)
    reset_peak(device)
    key = fingerprint(run_cfg, "train")
    prepared = method.prepare(ctx, model, tokenizer, key)
    out = ctx.stage_dir("train")
    train(ctx.accelerator, model, tokenizer, prepared.objective, prepared.examples, cfg, out, seed=run_cfg.seed,
          fingerprint=key, before_step=prepared.before_step)
    last = read_metrics(out)[-1]
    summary = {"method": run_cfg.method, "pairs": len(prepared.examples), "policy": policy,
               "peak_memory_mib": peak_mib(device), **method.train_summary(ctx, last["step"])}
    return {**summary, **last}
