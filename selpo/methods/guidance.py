"""Preference-grounded token-level guidance (arXiv 2306.00398): the two losses of its alternation, and the
alternation itself.

- ``TokenRewardRanking`` trains the reward model (``selpo.reward_model``): the token rewards of each
  sequence are aggregated into one score, and the scores of K ranked sequences get a Plackett-Luce loss
  (Bradley-Terry for a preference pair). The ``guidance`` stage trains the first reward model with it.
- ``RewardWeightedLikelihood`` trains the language model on the preferred responses (batches of them
  alone, as rankings of one), each token weighted by its reward normalised over its response
  (``extras["weights"]``, see ``reward_weights``).
- ``Alternation``, run by the policy's training before each step, retrains the reward model
  ``guidance.rounds`` times, every ``guidance.every`` steps: K responses per prompt are sampled from the
  current policy, ranked by the task's reward (``eval.reward``: VADER, a reward model or a function; see
  ``selpo.rewards``), and learned with the ranking loss; the policy's token weights are then recomputed from
  the new model. Each round is saved (``train/rewards/round-<r>/``) so a resumed training reuses it instead
  of sampling again.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..batches import Example
from ..context import Context, mark_done, read_done
from ..data import TokenizedPair, TokenizedRanking, encode_prompt
from ..distributed import map_batches
from ..kernels import linear_selective_loss, mean_lengths, plackett_luce_loss, sequence_scores
from ..logprobs import response_states
from ..options import LoopConfig, option, require
from ..reward_model import pair_rewards, token_rewards
from ..rewards import load_reward
from ..sampling import sample_responses
from ..stage import Stage
from ..trainer import train
from .base import Method, Prepared, view_row

SCALED = ("avg", "softmax", "softmin")  # aggregations scaled by the mean length C of the compared sequences
AGGREGATIONS = ("avg", "softmax", "softmin", "sum")


@dataclass
class GuidanceConfig(LoopConfig):
    """Token-level guidance (method "guidance"): a reward model giving each response token a reward in (0, 1],
    learned from sequence-level preferences, and its retraining on the policy's own ranked samples."""

    SECTION: typing.ClassVar[str] = "guidance"
    lr: float = option(2e-5, "Peak learning rate of AdamW (the scalar head starts from random weights).")
    fraction: float = option(0.3, "Share of the training pairs (a seeded random subset) the first guidance model "
                             "learns from, as the oracle does for SePO.")
    aggregation: str = option("softmax", "How a sequence's token rewards become its score: avg, softmax, softmin "
                              "(averaged ones scaled by the mean length of the compared sequences) or sum.")
    temperature: float = option(2.0, "Temperature of the softmax and softmin aggregations.")
    rounds: int = option(1, "Times the guidance model is retrained on the policy's samples in its training (0: never).")
    every: int = option(10, "Policy steps between retrainings: round r happens before step r * every.")
    samples: int = option(4, "Responses sampled per prompt for a retraining, ranked by the task's reward "
                          "(eval.reward; Plackett-Luce over them; 2 is Bradley-Terry).")
    prompts: int = option(16, "Training prompts sampled per retraining.")
    max_new_tokens: int = option(40, "Most tokens per sampled response.")
    retrain_epochs: int = option(2, "Passes over a round's ranked samples when retraining.")
    head: str = option("linear", "The reward model's token head: linear (selpo's: one linear layer and a sigmoid, "
                       "rewards in (0, 1)) or mlp (the released code's: a ReLU MLP with 2048 hidden units, its output "
                       "clamped by a double softplus, rewards in (1e-8, 1.31); see selpo.reward_model).")

    def __post_init__(self):
        super().__post_init__()
        s = self.SECTION
        require(s, "fraction", 0 < self.fraction <= 1, f"must lie in (0, 1], got {self.fraction}")
        require(s, "aggregation", self.aggregation in AGGREGATIONS,
                f"must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        require(s, "temperature", math.isfinite(self.temperature) and self.temperature > 0,
                f"must be > 0, got {self.temperature}")
        require(s, "rounds", self.rounds >= 0, f"must be >= 0, got {self.rounds}")
        for name in ("every", "prompts", "max_new_tokens", "retrain_epochs"):
            require(s, name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")
        require(s, "samples", self.samples >= 2, f"must be >= 2, got {self.samples}")
        require(s, "head", self.head in ("linear", "mlp"), f"must be one of ('linear', 'mlp'), got {self.head!r}")


GUIDANCE = Stage("guidance", needs=("data",), keys=("model", "seed", "guidance"), trains="reward model (ranking)",
                 help="train the token-level guidance model on a share of the training pairs")


@dataclass
class TokenRewardRanking:
    """Plackett-Luce loss of the aggregated token rewards of K ranked responses per prompt (batches from
    pairs, K = 2, or from ``TokenizedRanking`` examples)."""

    aggregation: str = "softmax"
    temperature: float = 2.0
    backend: str = "auto"

    def loss(self, model, batch):
        pairs = batch.pairs
        rewards = token_rewards(model, pairs)
        groups = pairs.num_pairs
        scale = mean_lengths(pairs.cu_seqlens, groups) if self.aggregation in SCALED else None
        scores = sequence_scores(rewards, pairs.cu_seqlens, aggregation=self.aggregation,
                                 temperature=self.temperature, scale=scale, backend=self.backend)
        return plackett_luce_loss(scores, groups)


@dataclass
class RewardWeightedLikelihood:
    """``-sum_t w_t log p(y_t)`` over each response of the batch, averaged over the responses."""

    backend: str = "auto"

    def loss(self, model, batch):
        pairs = batch.pairs
        hidden, head = response_states(model, pairs)
        return linear_selective_loss(hidden, head.weight, pairs.targets, pairs.cu_seqlens, loss="weighted_nll",
                                     weights=batch.extras["weights"], backend=self.backend, **head.op_kwargs())


@torch.no_grad()
def reward_weights(rewards: torch.Tensor) -> torch.Tensor:
    """The weights w_t = r_t / sum r of one response's token rewards (float32)."""
    rewards = rewards.float()
    return rewards / rewards.sum()


def ranking_objective(ctx: Context) -> TokenRewardRanking:
    """The reward model's ranking loss as ``guidance.aggregation`` and ``guidance.temperature`` set it."""
    cfg = ctx.config.guidance
    return TokenRewardRanking(aggregation=cfg.aggregation, temperature=cfg.temperature, backend=ctx.config.backend)


def chosen_responses(pairs: list[TokenizedPair]) -> list[TokenizedRanking]:
    """The preferred response of each pair as a ranking of one: the weighted likelihood trains on nothing
    else, so the rejected responses are not even run through the policy."""
    return [TokenizedRanking(p.prompt_ids, [p.chosen_ids], row=p.row) for p in pairs]


def weighted_examples(ctx: Context, reward_model, responses: list[TokenizedRanking]) -> list[Example]:
    """The responses with ``extras["weights"]``: w_t = r_t / sum r over each one."""
    rewards = pair_rewards(ctx.accelerator, reward_model, responses, batch_size=ctx.config.guidance.micro_batch_size)
    return [Example(c, {"weights": (reward_weights(r),)}) for c, (r,) in zip(responses, rewards)]


def round_folder(ctx: Context, r: int) -> Path:
    return ctx.stage_dir("train") / "rewards" / f"round-{r}"


def reward_model_path(ctx: Context, r: int) -> str:
    """The reward model of round ``r``: 0 is the ``guidance`` stage's, later ones are saved by the training."""
    return str(round_folder(ctx, r) / "model") if r else ctx.model_path("guidance")


class Alternation:
    """The ``before_step`` hook of the policy's training: before step r * every (1 <= r <= rounds) it
    retrains the reward model on the policy's ranked samples and replaces the examples' weights in place.

    Round 0 is the ``guidance`` stage's model; ``examples`` (``weighted_examples``) must hold its weights
    when training starts. ``key`` identifies the training: a saved round is reused only under the same key.
    """

    def __init__(self, ctx: Context, tokenizer, examples: list[Example], key: str):
        self.ctx, self.tokenizer, self.examples, self.key = ctx, tokenizer, examples, key
        self.done_rounds = 0

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
        if read_done(round_folder(self.ctx, r), self.key) is not None:
            return torch.load(round_folder(self.ctx, r) / "weights.pt")
        return None

    def _retrain(self, r: int, policy) -> list:
        ctx, cfg, seed = self.ctx, self.ctx.config.guidance, self.ctx.config.seed
        ctx.print(f"== guidance round {r}: sampling {cfg.samples} responses to {cfg.prompts} prompts from the policy")
        rankings = self._ranked_samples(r, policy)
        model, tokenizer = ctx.load_reward_model(reward_model_path(ctx, r - 1), head=cfg.head)
        micro = min(cfg.micro_batch_size, len(rankings))
        per_step = micro * ctx.accelerator.num_processes  # a batch as close to guidance.batch_size as fits
        loop = dataclasses.replace(cfg, epochs=cfg.retrain_epochs, max_steps=None, micro_batch_size=micro,
                                   batch_size=max(per_step, min(cfg.batch_size, len(rankings)) // per_step * per_step))
        folder = round_folder(ctx, r)
        with torch.random.fork_rng(devices=[]):  # the policy's own random state goes on untouched
            model = train(ctx.accelerator, model, tokenizer, ranking_objective(ctx), [Example(k) for k in rankings],
                          loop, folder, seed=seed + r, fingerprint=f"{self.key}-round-{r}")
        weights = [e.extras["weights"] for e in weighted_examples(ctx, model, [e.pair for e in self.examples])]
        if ctx.accelerator.is_main_process:
            torch.save(weights, folder / "weights.pt.tmp")
            (folder / "weights.pt.tmp").replace(folder / "weights.pt")
            mark_done(folder, {"fingerprint": self.key, "rankings": len(rankings)})
        ctx.accelerator.wait_for_everyone()
        return weights

    def _ranked_samples(self, r: int, policy) -> list[TokenizedRanking]:
        ctx, cfg = self.ctx, self.ctx.config.guidance
        prompts = ctx.prompts("train")
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

        rankings = map_batches(ctx.accelerator, list(enumerate(chosen)), cfg.micro_batch_size, draw,
                               desc=f"guidance round {r}: sampling and ranking")
        policy.train(was_training)
        return rankings


class GuidanceMethod(Method):
    name = "guidance"
    title = "token-level guidance"
    options = GuidanceConfig
    stages = (GUIDANCE,)
    strength = "guidance.temperature"
    grid = (2.0, 0.5)
    legend = ("the reward model's token reward r<sub>t</sub> in (0, 1); outlined: the tokens the weighted "
              "likelihood reads (the chosen response, weights r<sub>t</sub> / sum r)")
    stage_keys = {"train": ("eval.reward",)}  # its retraining rounds rank samples by the reward

    def check(self, config):
        if config.guidance.rounds > 0 and config.eval.reward == "none":
            raise ValueError("eval.reward is none, but method guidance ranks its retraining samples by it: give a "
                             "reward or set guidance.rounds=0")

    def prepare(self, ctx, policy, tokenizer, key):
        reward_model, _ = ctx.load_reward_model(ctx.model_path("guidance"), head=ctx.config.guidance.head)
        examples = weighted_examples(ctx, reward_model, chosen_responses(ctx.pairs("train")))
        del reward_model
        objective = RewardWeightedLikelihood(backend=ctx.config.backend)
        return Prepared(objective, examples, Alternation(ctx, tokenizer, examples, key))

    def train_summary(self, ctx, steps):
        """The reward model in use at the end of the training: eval's token view reads it."""
        cfg = ctx.config.guidance
        return {"reward_model": reward_model_path(ctx, min((steps - 1) // cfg.every, cfg.rounds))}

    def token_view(self, ctx, pairs, logps):
        """The final reward model's token rewards; the loss reads the chosen responses only."""
        summary = ctx.done_record("train")["summary"]
        model, _ = ctx.load_reward_model(summary["reward_model"], head=ctx.config.guidance.head)
        rewards = pair_rewards(ctx.accelerator, model, pairs, batch_size=ctx.config.eval.batch_size)
        return [view_row(p, (c.tolist(), r.tolist()), ([1] * len(c), [0] * len(r)))
                for p, (c, r) in zip(pairs, rewards)]
