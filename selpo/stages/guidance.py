"""Stage ``guidance`` and its sequel during training: token-level guidance's reward model.

The stage trains the first reward model (``selpo.reward_model``) on a seeded share of the training
pairs, each pair a ranking of two (Bradley-Terry). During the policy's training (``Alternation``, run by
the ``train`` stage before each step), the reward model is retrained ``guidance.rounds`` times, every
``guidance.every`` steps: K responses per prompt are sampled from the current policy, ranked by the
task's reward (``eval.reward``: VADER, a reward model or a function; see ``selpo.rewards``), and learned
with a Plackett-Luce loss; the policy's token weights are then recomputed from the new model. Each round
is saved (``train/rewards/round-<r>/``) so a resumed training reuses it instead of sampling again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_text_atomic
from ..data import TokenizedPair, TokenizedRanking, encode_prompt
from ..distributed import map_batches
from ..examples import Example
from ..methods import TokenRewardRanking, reward_weights
from ..reward_model import load_reward_model, pair_rewards
from ..rewards import load_reward
from ..sentiment import sample_responses
from ..trainer import make_accelerator, read_metrics, train
from .data import load_pairs, load_prompts
from .oracle import subset
from .pipeline import Context, fingerprint


def ranking_method(ctx: Context) -> TokenRewardRanking:
    cfg = ctx.config.guidance
    return TokenRewardRanking(aggregation=cfg.aggregation, temperature=cfg.temperature, backend=ctx.config.backend)


def run(ctx: Context) -> dict:
    cfg, run_cfg = ctx.config.guidance, ctx.config
    pairs = load_pairs(ctx, "train")
    chosen = subset(len(pairs), cfg.fraction, run_cfg.seed)
    model, tokenizer = load_reward_model(run_cfg.model, device=ctx.accelerator.device, head=cfg.head)
    out = ctx.stage_dir("guidance")
    train(ctx.accelerator, model, tokenizer, ranking_method(ctx), [Example(pairs[i]) for i in chosen], cfg, out,
          seed=run_cfg.seed, fingerprint=fingerprint(run_cfg, "guidance"))
    return {"pairs": len(chosen), **read_metrics(out)[-1]}


def chosen_responses(pairs: list[TokenizedPair]) -> list[TokenizedRanking]:
    """The preferred response of each pair as a ranking of one: the weighted likelihood trains on nothing
    else, so the rejected responses are not even run through the policy."""
    return [TokenizedRanking(p.prompt_ids, [p.chosen_ids], row=p.row) for p in pairs]


def weighted_examples(ctx: Context, reward_model, responses: list[TokenizedRanking]) -> list[Example]:
    """The responses with ``extras["weights"]``: w_t = r_t / sum r over each one."""
    rewards = pair_rewards(ctx.accelerator, reward_model, responses, batch_size=ctx.config.guidance.micro_batch_size)
    return [Example(c, {"weights": (reward_weights(r),)}) for c, (r,) in zip(responses, rewards)]


class Alternation:
    """The ``before_step`` hook of the policy's training: before step r * every (1 <= r <= rounds) it
    retrains the reward model on the policy's ranked samples and replaces the examples' weights in place.

    Round 0 is the ``guidance`` stage's model; ``examples`` (``weighted_examples``) must hold its weights
    when training starts.
    """

    def __init__(self, ctx: Context, tokenizer, examples: list[Example]):
        self.ctx, self.tokenizer, self.examples = ctx, tokenizer, examples
        self.done_rounds = 0
        self.key = fingerprint(ctx.config, "train")

    def folder(self, r: int) -> Path:
        return self.ctx.stage_dir("train") / "rewards" / f"round-{r}"

    def model_path(self, r: int) -> str:
        return str((self.folder(r) if r else self.ctx.stage_dir("guidance")) / "model")

    def model_after(self, steps: int) -> str:
        """The reward model in use at the end of a training of ``steps`` steps."""
        cfg = self.ctx.config.guidance
        return self.model_path(min((steps - 1) // cfg.every, cfg.rounds))

    def __call__(self, step: int, policy) -> None:
        cfg = self.ctx.config.guidance
        for r in range(self.done_rounds + 1, min(step // cfg.every, cfg.rounds) + 1):
            weights = self._load(r)
            if weights is None:
                weights = self._retrain(r, policy)
            for i, w in enumerate(weights):
                self.examples[i] = Example(self.examples[i].pair, {"weights": w})
            self.done_rounds = r

    def _load(self, r: int):
        done = self.folder(r) / "DONE.json"
        if done.is_file() and json.loads(done.read_text())["fingerprint"] == self.key:
            return torch.load(self.folder(r) / "weights.pt")
        return None

    def _retrain(self, r: int, policy) -> list:
        ctx, cfg, seed = self.ctx, self.ctx.config.guidance, self.ctx.config.seed
        ctx.print(f"== guidance round {r}: sampling {cfg.samples} responses to {cfg.prompts} prompts from the policy")
        rankings = self._ranked_samples(r, policy)
        model, tokenizer = load_reward_model(self.model_path(r - 1), device=ctx.accelerator.device)
        micro = min(cfg.micro_batch_size, len(rankings))
        per_step = micro * ctx.accelerator.num_processes  # a batch as close to guidance.batch_size as fits
        loop = dataclasses.replace(cfg, epochs=cfg.retrain_epochs, max_steps=None, micro_batch_size=micro,
                                   batch_size=max(per_step, min(cfg.batch_size, len(rankings)) // per_step * per_step))
        with torch.random.fork_rng(devices=[]):  # the policy's own random state goes on untouched
            model = train(make_accelerator(ctx.config), model, tokenizer, ranking_method(ctx),
                          [Example(k) for k in rankings], loop, self.folder(r), seed=seed + r,
                          fingerprint=f"{self.key}-round-{r}")
        weights = [e.extras["weights"] for e in weighted_examples(ctx, model, [e.pair for e in self.examples])]
        if ctx.accelerator.is_main_process:
            tmp = self.folder(r) / "weights.pt.tmp"
            torch.save(weights, tmp)
            tmp.replace(self.folder(r) / "weights.pt")
            write_text_atomic(self.folder(r) / "DONE.json",
                              json.dumps({"fingerprint": self.key, "rankings": len(rankings)}))
        ctx.accelerator.wait_for_everyone()
        return weights

    def _ranked_samples(self, r: int, policy) -> list[TokenizedRanking]:
        ctx, cfg = self.ctx, self.ctx.config.guidance
        prompts = load_prompts(ctx, "train")
        order = np.random.default_rng([ctx.config.seed, r]).permutation(len(prompts))[:cfg.prompts]
        chosen = [prompts[i] for i in sorted(order.tolist())]
        was_training = policy.training
        policy.eval()
        reward = load_reward(ctx.config.eval.reward, device=ctx.accelerator.device, autocast=ctx.accelerator.autocast,
                             batch_size=cfg.samples * cfg.micro_batch_size)

        def draw(chunk):
            completions = sample_responses(policy, self.tokenizer, [p for _, p in chunk], num_samples=cfg.samples,
                                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.samples * len(chunk),
                                           seed=ctx.config.seed + 1000 * r + chunk[0][0])
            ranked = []
            for (i, prompt), group in zip(chunk, completions):
                rewards = reward([prompt] * len(group), [c.text for c in group])
                best_first = sorted(range(len(group)), key=lambda k: -rewards[k])  # stable: ties keep order
                ranked.append(TokenizedRanking(encode_prompt(self.tokenizer, prompt),
                                               [group[k].ids for k in best_first], row=i))
            return ranked

        rankings = map_batches(ctx.accelerator, list(enumerate(chosen)), cfg.micro_batch_size, draw)
        policy.train(was_training)
        return rankings
