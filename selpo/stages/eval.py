"""Stage ``eval``: the initial model against the trained policy, on held-out prompts and pairs.

- reward: the mean ground-truth reward (``eval.reward``, see ``selpo.rewards``: VADER's compound score by
  default) of samples (two per prompt, temperature ``eval.temperature``); with a reward model or a function,
  also the policy's win rate over the initial model (its k-th sample against the initial model's k-th on the
  same prompt, ties counting half) and its standard error; with ``none``, no reward at all;
- KL(policy || initial): mean over the policy's samples of sum_t (log p_policy - log p_initial), an
  unbiased estimate when sampling at temperature 1 (0 for the initial model by definition);
- held-out preference accuracy: the share of pairs whose chosen response gets the higher implicit
  reward sum_t (log p_model - log p_initial) (policy and oracle), and the higher mean log-prob; and the
  mean margins (chosen minus rejected) of both;
- the method's view of the first ``eval.token_pairs`` training pairs (``tokens.jsonl``, the report's
  heatmap): each response token's score or weight under the method, and whether its loss reads it;
- selection precision (methods that select tokens, e.g. sepo, selective_dpo; reward vader only): the share of
  the selected tokens that belong to VADER lexicon words, next to the share a random selection would give
  (the share of such tokens overall);
- token share: the mean share of response tokens the training loss read, over the training steps.

One model is held at a time (a LoRA policy on the initial model is the initial model too, its adapter disabled:
the same weights); sampling and scoring are sharded over the processes, each with a progress bar.
"""

from __future__ import annotations

import contextlib
import json

import torch

from .. import lora, methods
from ..atomic import write_text_atomic
from ..context import Context, write_jsonl
from ..data import TokenizedPair, encode_prompt
from ..distributed import map_batches
from ..logprobs import pair_logps
from ..methods import TokenLogps
from ..models import resolve_model_path
from ..rewards import VADER, describe, load_reward
from ..sampling import sample_responses
from ..sentiment import key_token_mask
from ..trainer import read_metrics
from .pipeline import pipeline

SAMPLES_PER_PROMPT = 2  # packed as one "pair" per prompt, the layout the log-prob pass takes


def sample(ctx: Context, model, tokenizer, prompts: list, name: str) -> list[TokenizedPair]:
    """Two samples per prompt as a TokenizedPair each (no preference implied), fixed by the seed; ``name``: the
    model's, for the progress bar."""
    cfg = ctx.config.eval

    def draw(chunk):
        first = chunk[0][0]
        completions = sample_responses(model, tokenizer, [p for _, p in chunk], num_samples=SAMPLES_PER_PROMPT,
                                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       batch_size=SAMPLES_PER_PROMPT * len(chunk), seed=ctx.config.seed + first)
        return [TokenizedPair(encode_prompt(tokenizer, p), c[0].ids, c[1].ids, row=i)
                for (i, p), c in zip(chunk, completions)]

    return map_batches(ctx.accelerator, list(enumerate(prompts)), cfg.batch_size, draw, desc=f"sampling ({name})")


def texts(tokenizer, samples: list[TokenizedPair]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True).strip()
            for s in samples for ids in (s.chosen_ids, s.rejected_ids)]


def sums(logps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[P, 2] summed log-probs of (chosen, rejected) per pair."""
    return torch.tensor([[float(c.sum()), float(r.sum())] for c, r in logps]).reshape(-1, 2)


def means(logps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.tensor([[float(c.mean()), float(r.mean())] for c, r in logps]).reshape(-1, 2)


def accuracy(rewards: torch.Tensor) -> float:
    """Share of pairs whose chosen reward (column 0) beats the rejected one (column 1)."""
    return float((rewards[:, 0] > rewards[:, 1]).float().mean())


def margin(rewards: torch.Tensor) -> float:
    """Mean of chosen minus rejected reward over the pairs."""
    return float((rewards[:, 0] - rewards[:, 1]).mean())


def win_rate(policy: list[float], initial: list[float]) -> dict:
    """Share of samples whose reward beats the initial model's sample of the same prompt and index (ties
    count half), and its standard error over the samples."""
    wins = torch.tensor([1.0 if p > i else 0.5 if p == i else 0.0 for p, i in zip(policy, initial)],
                        dtype=torch.float64)
    stderr = float(wins.std() / len(wins) ** 0.5) if len(wins) > 1 else 0.0
    return {"rate": float(wins.mean()), "stderr": stderr}


def score_samples(ctx: Context, prompts: list, *samples: list[str]) -> list[list[float] | None]:
    """Per list of sample texts, the ground-truth reward of each (``eval.reward``; None for none), sharded over
    the processes; the reward (a model, perhaps) is loaded once for all."""
    cfg, device = ctx.config.eval, ctx.accelerator.device
    reward = load_reward(cfg.reward, device=device, autocast=ctx.accelerator.autocast, batch_size=cfg.batch_size)
    if reward is None:
        return [None] * len(samples)
    return [map_batches(ctx.accelerator, [(prompts[k // SAMPLES_PER_PROMPT], t) for k, t in enumerate(texts)],
                        cfg.batch_size, lambda chunk: reward(*map(list, zip(*chunk))),
                        desc=f"scoring samples ({i + 1} of {len(samples)})") for i, texts in enumerate(samples)]


def mean(values: list[float] | None) -> float | None:
    return None if values is None else sum(values) / len(values)


def selection_precision(tokenizer, rows: list[dict], side: str) -> dict:
    """Precision of the selected tokens of one side ("chosen"/"rejected") at VADER words, and random's."""
    selected = hits = key_total = tokens = 0
    for row in rows:
        key = key_token_mask(tokenizer, row[f"{side}_ids"])
        mask = row[f"{side}_mask"]
        selected += sum(mask)
        hits += sum(k and m for k, m in zip(key, mask))
        key_total += sum(key)
        tokens += len(key)
    return {f"{side}_precision": hits / max(selected, 1), f"{side}_random_precision": key_total / max(tokens, 1)}


def run(ctx: Context) -> dict:
    cfg, run_cfg = ctx.config.eval, ctx.config
    method = methods.get(run_cfg.method)
    prompts = ctx.prompts("test")[:cfg.prompts]
    test_pairs = ctx.pairs("test")
    view_pairs = ctx.pairs("train")[:cfg.token_pairs]
    has_oracle = "oracle" in pipeline(run_cfg.method)
    policy, tokenizer = ctx.load_causal_lm(ctx.model_path("train"))

    def logps(model, pairs, desc):
        return pair_logps(ctx.accelerator, model, pairs, pad_id=tokenizer.pad_token_id, batch_size=cfg.batch_size,
                          backend=run_cfg.backend, desc=desc)

    policy_samples = sample(ctx, policy, tokenizer, prompts, "policy")
    policy_on_samples = sums(logps(policy, policy_samples, "policy log-probs of its samples"))
    policy_test = logps(policy, test_pairs, "policy log-probs of held-out pairs")
    policy_view = logps(policy, view_pairs, "policy log-probs of viewed pairs")
    shared = lora.adapts(policy, resolve_model_path(run_cfg.model))  # a LoRA policy: the initial model is its base
    initial = policy if shared else None
    del policy  # one model at a time
    initial = initial if shared else ctx.load_causal_lm(run_cfg.model)[0]
    with lora.adapter_disabled(initial) if shared else contextlib.nullcontext():
        initial_samples = sample(ctx, initial, tokenizer, prompts, "initial model")
        initial_on_samples = sums(logps(initial, policy_samples, "initial log-probs of the policy's samples"))
        initial_test = logps(initial, test_pairs, "initial log-probs of held-out pairs")
        initial_view = logps(initial, view_pairs, "initial log-probs of viewed pairs")
    del initial
    oracle_test = oracle_view = None
    if has_oracle:
        oracle, _ = ctx.load_causal_lm(ctx.model_path("oracle"))
        oracle_test = logps(oracle, test_pairs, "oracle log-probs of held-out pairs")
        oracle_view = logps(oracle, view_pairs, "oracle log-probs of viewed pairs")
        del oracle
    views = method.token_view(ctx, view_pairs, TokenLogps(policy_view, initial_view, oracle_view))

    policy_texts, initial_texts = texts(tokenizer, policy_samples), texts(tokenizer, initial_samples)
    ctx.print(f"eval.reward: {describe(cfg.reward)}")
    policy_rewards, initial_rewards = score_samples(ctx, prompts, policy_texts, initial_texts)
    shares = [r["token_share"] for r in read_metrics(ctx.stage_dir("train")) if "token_share" in r]
    implicit = sums(policy_test) - sums(initial_test)
    results = {
        "method": run_cfg.method,
        "prompts": len(prompts), "samples": len(policy_texts), "test_pairs": len(test_pairs),
        "reward": {"spec": cfg.reward, "description": describe(cfg.reward)},
        "initial": {"reward": mean(initial_rewards), "kl": 0.0,
                    "likelihood_accuracy": accuracy(means(initial_test)), "logp_margin": margin(means(initial_test))},
        "policy": {"reward": mean(policy_rewards),
                   "kl": float((policy_on_samples - initial_on_samples).mean()),
                   "implicit_accuracy": accuracy(implicit), "implicit_margin": margin(implicit),
                   "likelihood_accuracy": accuracy(means(policy_test)), "logp_margin": margin(means(policy_test)),
                   "token_share": sum(shares) / len(shares) if shares else None},
    }
    if policy_rewards is not None and cfg.reward != VADER:
        results["win_rate"] = win_rate(policy_rewards, initial_rewards)
    if has_oracle:
        results["oracle"] = {"implicit_accuracy": accuracy(sums(oracle_test) - sums(initial_test))}
    if method.selects and cfg.reward == VADER:
        results["selection"] = {**selection_precision(tokenizer, views, "chosen"),
                                **selection_precision(tokenizer, views, "rejected")}
    if ctx.accelerator.is_main_process:
        out = ctx.stage_dir("eval")
        write_text_atomic(out / "results.json", json.dumps(results, indent=1))
        write_jsonl(out / "tokens.jsonl", views)
        write_jsonl(out / "samples.jsonl", [
            {"prompt": prompts[k // SAMPLES_PER_PROMPT], "initial": initial_texts[k],
             "initial_reward": initial_rewards[k] if initial_rewards else None, "policy": policy_texts[k],
             "policy_reward": policy_rewards[k] if policy_rewards else None}
            for k in range(len(policy_texts))])
    return results

