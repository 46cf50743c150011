"""Stage ``train``: the policy trained with the run's method on all training pairs.

The policy is a fresh copy of the initial model, or ``train.policy``: any model sharing the data's
tokenizer, e.g. a larger one supervised by a small oracle. What each method brings to the shared loop
(``selpo.trainer``) is set up here: its loss (``selpo.methods``), the per-token values its examples
carry, and for token-level guidance the reward model's retraining rounds.
"""

from __future__ import annotations

from ..examples import Example
from ..memory import peak_mib, reset_peak
from ..methods import DPO, RewardWeightedLikelihood, SelectiveDPO, SePO, SimPO, with_reference_logps
from ..models import load_causal_lm, load_tokenizer
from ..reward_model import load_reward_model
from ..trainer import read_metrics, train
from .data import load_pairs
from .guidance import Alternation, chosen_responses, weighted_examples
from .pipeline import Context, fingerprint
from .score import load_scored, selected_examples


def check_same_tokenizer(policy_tokenizer, data_tokenizer, policy: str) -> None:
    """The pairs were tokenized for the run's model; a policy must read the same ids the same way."""
    if policy_tokenizer.get_vocab() != data_tokenizer.get_vocab():
        raise ValueError(f"train.policy: {policy!r} has a different tokenizer than the run's model, so it cannot "
                         "be trained on the tokenized and scored pairs; use a model of the same family")


def reference_examples(ctx: Context, reference, tokenizer) -> list[Example]:
    """Every training pair with the reference's log-probs of its response tokens (computed once)."""
    return with_reference_logps(ctx.accelerator, reference, [Example(p) for p in load_pairs(ctx, "train")],
                                pad_id=tokenizer.pad_token_id, batch_size=ctx.config.train.micro_batch_size,
                                backend=ctx.config.backend)


def prepare(ctx: Context, policy, tokenizer):
    """(method, examples, before_step hook or None) for the run's method."""
    cfg, backend, name = ctx.config.train, ctx.config.backend, ctx.config.method
    if name == "sepo":
        method = SePO(gamma=cfg.gamma, margin=cfg.margin_for(name), backend=backend)
        return method, selected_examples(load_scored(ctx)), None
    if name == "dpo":  # the reference is the policy as it starts
        return DPO(beta=cfg.beta_for(name), backend=backend), reference_examples(ctx, policy, tokenizer), None
    if name == "simpo":
        method = SimPO(beta=cfg.beta_for(name), gamma=cfg.margin_for(name), backend=backend)
        return method, [Example(p) for p in load_pairs(ctx, "train")], None
    if name == "selective_dpo":  # the strong reference: the DPO-trained oracle
        reference, _ = load_causal_lm(str(ctx.stage_dir("oracle") / "model"), device=ctx.accelerator.device)
        examples = reference_examples(ctx, reference, tokenizer)
        del reference
        return SelectiveDPO(beta=cfg.beta_for(name), ratio=cfg.selective_ratio, rule=cfg.selective_rule,
                            backend=backend), examples, None
    if name == "guidance":
        reward_model, _ = load_reward_model(str(ctx.stage_dir("guidance") / "model"), device=ctx.accelerator.device)
        examples = weighted_examples(ctx, reward_model, chosen_responses(load_pairs(ctx, "train")))
        del reward_model
        return RewardWeightedLikelihood(backend=backend), examples, Alternation(ctx, tokenizer, examples)
    raise ValueError(f"method: unknown method {name!r}")


def run(ctx: Context) -> dict:
    cfg, run_cfg, device = ctx.config.train, ctx.config, ctx.accelerator.device
    policy = cfg.policy or run_cfg.model
    model, tokenizer = load_causal_lm(policy, device=device)
    if cfg.policy is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(run_cfg.model), cfg.policy)
    reset_peak(device)
    method, examples, before_step = prepare(ctx, model, tokenizer)
    out = ctx.stage_dir("train")
    train(ctx.accelerator, model, tokenizer, method, examples, cfg, out, seed=run_cfg.seed,
          fingerprint=fingerprint(run_cfg, "train"), before_step=before_step)
    last = read_metrics(out)[-1]
    summary = {"method": run_cfg.method, "pairs": len(examples), "policy": policy, "peak_memory_mib": peak_mib(device)}
    if isinstance(before_step, Alternation):
        summary["reward_model"] = before_step.model_after(last["step"])
    return {**summary, **last}
