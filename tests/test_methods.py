"""The methods beside SePO (selpo.methods, selpo.reward_model): Selective-DPO, token-level guidance, DPO and
SimPO. Each loss against hand-computed values or the full-logit math, on a tiny random Llama; ranked batches.
End-to-end runs of every method are in test_methods_e2e.py."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selpo.batches import Example, collate
from selpo.data import TokenizedPair, TokenizedRanking, load_preference_dataset, tokenize_pairs
from selpo.methods import (
    RewardWeightedLikelihood,
    SelectiveDPO,
    SimPO,
    TokenRewardRanking,
    reward_weights,
    selection_scores,
)
from selpo.methods.guidance import chosen_responses
from selpo.models import load_causal_lm
from selpo.reward_model import load_reward_model, token_rewards
from selpo.testing import tiny_model_dir

sys.path.insert(0, str(Path(__file__).parent))
from tiny_data import write_pairs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    model_dir = tiny_model_dir(root)
    model, tokenizer = load_causal_lm(model_dir)
    pairs, _ = tokenize_pairs(load_preference_dataset(write_pairs(root / "pairs.jsonl", 8)), tokenizer,
                              max_length=48, max_prompt_length=24)
    return model_dir, tokenizer, pairs


def full_logit_logps(model, pairs):
    """float64 per response token log-probs from the model's full logits: the reference."""
    logits = model(input_ids=pairs.input_ids, attention_mask=pairs.attention_mask).logits.double()
    return torch.log_softmax(logits.flatten(0, 1)[pairs.positions], -1).gather(1, pairs.targets[:, None]).squeeze(1)


def segments(values, cu):
    return [values[cu[s]:cu[s + 1]] for s in range(len(cu) - 1)]


# ---- Selective-DPO ----

def test_selection_scores_by_hand():
    """Chosen: ref - policy; rejected: policy - ref."""
    logps = torch.tensor([-1.0, -2.0, -3.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -2.0, -1.0])
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    assert selection_scores(logps, ref, cu).tolist() == [-0.5, 1.0, -1.0, 0.5]


def test_selective_dpo_keeps_the_top_share_and_applies_dpo_to_it(tiny):
    model_dir, tokenizer, pairs = tiny
    model, _ = load_causal_lm(model_dir)
    generator = torch.Generator().manual_seed(3)
    examples = [Example(p, {"ref_logps": (-3 * torch.rand(len(p.chosen_ids), generator=generator),
                                          -3 * torch.rand(len(p.rejected_ids), generator=generator))})
                for p in pairs[:3]]
    batch = collate(examples, tokenizer.pad_token_id)
    loss, metrics = SelectiveDPO(beta=0.7, ratio=0.4, backend="torch").loss(model, batch)

    logps, ref = full_logit_logps(model, batch.pairs), batch.extras["ref_logps"].double()
    cu = batch.pairs.cu_seqlens.tolist()
    rewards, kept = [], []
    for s, (lp, rf) in enumerate(zip(segments(logps, cu), segments(ref, cu))):
        score = (rf - lp) if s < 3 else (lp - rf)
        k = max(1, math.floor(0.4 * len(lp)))
        top = sorted(range(len(lp)), key=lambda i: (-score[i].item(), i))[:k]  # ties: lower position first
        rewards.append(0.7 * sum(lp[i] - rf[i] for i in top))
        kept.append(k)
    expected = sum(-F.logsigmoid(rewards[i] - rewards[3 + i]) for i in range(3)) / 3
    assert abs(loss.item() - expected.item()) < 1e-5
    assert metrics["selected"].tolist() == kept
    loss.backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


# ---- SimPO ----

def test_simpo_matches_its_formula(tiny):
    model_dir, tokenizer, pairs = tiny
    model, _ = load_causal_lm(model_dir)
    batch = collate([Example(p) for p in pairs[:3]], tokenizer.pad_token_id)
    loss, metrics = SimPO(beta=2.5, gamma=0.4, backend="torch").loss(model, batch)
    means = [2.5 * v.mean() for v in segments(full_logit_logps(model, batch.pairs), batch.pairs.cu_seqlens.tolist())]
    expected = sum(-F.logsigmoid(means[i] - means[3 + i] - 0.4) for i in range(3)) / 3
    assert abs(loss.item() - expected.item()) < 1e-5
    assert metrics["selected"].tolist() == batch.pairs.cu_seqlens.diff().tolist()  # every token


# ---- token-level guidance ----

def test_reward_weights_by_hand():
    torch.testing.assert_close(reward_weights(torch.tensor([1.0, 3.0])), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(reward_weights(torch.tensor([0.2, 0.6, 0.2])), torch.tensor([0.2, 0.6, 0.2]))
    assert reward_weights(torch.tensor([0.5])).tolist() == [1.0]


def test_reward_weighted_likelihood_trains_on_the_chosen_responses_alone(tiny):
    model_dir, tokenizer, pairs = tiny
    model, _ = load_causal_lm(model_dir)
    generator = torch.Generator().manual_seed(5)
    chosen = chosen_responses(pairs[:3])
    assert [c.responses for c in chosen] == [[p.chosen_ids] for p in pairs[:3]]
    examples = [Example(c, {"weights": (reward_weights(torch.rand(len(c.responses[0]), generator=generator) + 0.01),)})
                for c in chosen]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch.pairs.input_ids.shape[0] == 3  # no rejected response goes through the model
    loss, metrics = RewardWeightedLikelihood(backend="torch").loss(model, batch)
    cu = batch.pairs.cu_seqlens.tolist()
    nll = [-(w.double() * lp).sum() for w, lp in zip(segments(batch.extras["weights"], cu),
                                                      segments(full_logit_logps(model, batch.pairs), cu))]
    assert abs(loss.item() - (sum(nll) / 3).item()) < 1e-5  # the mean over the chosen responses
    assert metrics["selected"].tolist() == [len(p.chosen_ids) for p in pairs[:3]]


def test_token_rewards_are_read_at_each_token_in_zero_one(tiny):
    model_dir, tokenizer, pairs = tiny
    model, _ = load_reward_model(model_dir)
    batch = collate([Example(p) for p in pairs[:2]], tokenizer.pad_token_id).pairs
    rewards = token_rewards(model, batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, T, 1]
    expected = torch.sigmoid(logits.flatten(0, 1)[batch.positions + 1, 0])
    torch.testing.assert_close(rewards, expected)
    assert rewards.shape == batch.targets.shape and ((rewards > 0) & (rewards < 1)).all()


def _aggregate(r, aggregation, temperature, c):
    if aggregation == "avg":
        return c * r.mean()
    if aggregation == "softmax":
        return c * temperature * torch.log(torch.exp(r / temperature).sum())
    if aggregation == "softmin":
        return -c * temperature * torch.log(torch.exp(-r / temperature).sum())
    return r.sum()


@pytest.mark.parametrize("aggregation", ["avg", "softmax", "softmin", "sum"])
def test_reward_ranking_of_pairs_is_bradley_terry_of_the_aggregated_rewards(tiny, aggregation):
    model_dir, tokenizer, pairs = tiny
    model, _ = load_reward_model(model_dir)
    batch = collate([Example(p) for p in pairs[:3]], tokenizer.pad_token_id)
    loss, metrics = TokenRewardRanking(aggregation=aggregation, temperature=1.5, backend="torch").loss(model, batch)
    rewards = token_rewards(model, batch.pairs).double()
    lengths = batch.pairs.cu_seqlens.diff().double()
    scores = []
    for s, r in enumerate(segments(rewards, batch.pairs.cu_seqlens.tolist())):
        c = (lengths[s % 3] + lengths[3 + s % 3]) / 2  # mean length of the two compared responses
        scores.append(_aggregate(r, aggregation, 1.5, c))
    expected = sum(-F.logsigmoid(scores[i] - scores[3 + i]) for i in range(3)) / 3
    assert abs(loss.item() - expected.item()) < 1e-5
    assert metrics["accuracy"].tolist() == [float(scores[i] > scores[3 + i]) for i in range(3)]
    loss.backward()
    assert model.score.weight.grad.abs().sum() > 0


def test_reward_ranking_of_k_samples_is_plackett_luce(tiny):
    model_dir, tokenizer, pairs = tiny
    model, _ = load_reward_model(model_dir)
    rankings = [TokenizedRanking(p.prompt_ids, [p.chosen_ids, p.rejected_ids, p.chosen_ids[:2]], row=p.row)
                for p in pairs[:2]]
    batch = collate([Example(k) for k in rankings], tokenizer.pad_token_id)
    loss, _ = TokenRewardRanking(aggregation="sum", backend="torch").loss(model, batch)
    sums = [r.sum() for r in segments(token_rewards(model, batch.pairs).double(), batch.pairs.cu_seqlens.tolist())]
    expected = 0.0
    for g in range(2):
        e = [sums[k * 2 + g] for k in range(3)]  # rank-major: segment k * G + g
        expected += -sum(e[k] - torch.logsumexp(torch.stack(e[k:]), 0) for k in range(3))
    assert abs(loss.item() - expected.item() / 2) < 1e-5


# ---- ranked batches ----

def test_rankings_pack_rank_by_rank_with_their_extras():
    rankings = [TokenizedRanking([1, 2], [[3], [4, 5], [6]], row=0), TokenizedRanking([7], [[8, 9], [10], [11]], row=1)]
    extras = [{"w": (torch.tensor([0.1]), torch.tensor([0.2, 0.3]), torch.tensor([0.4]))},
              {"w": (torch.tensor([0.5, 0.6]), torch.tensor([0.7]), torch.tensor([0.8]))}]
    batch = collate([Example(k, e) for k, e in zip(rankings, extras)], pad_id=0)
    assert batch.pairs.targets.tolist() == [3, 8, 9, 4, 5, 10, 6, 11]
    assert batch.pairs.cu_seqlens.tolist() == [0, 1, 3, 5, 6, 7, 8]
    assert batch.pairs.num_pairs == 2
    torch.testing.assert_close(batch.extras["w"], torch.tensor([0.1, 0.5, 0.6, 0.2, 0.3, 0.7, 0.4, 0.8]))
    flat = batch.pairs.input_ids.flatten()
    assert flat[batch.pairs.positions + 1].tolist() == batch.pairs.targets.tolist()
    pair = TokenizedPair([1, 2], [3], [4, 5], row=0)  # a pair is a ranking of two
    assert collate([Example(pair)], 0).pairs.targets.tolist() == [3, 4, 5]


def test_rankings_of_different_sizes_are_refused():
    rankings = [TokenizedRanking([1], [[2], [3]], row=0), TokenizedRanking([1], [[2], [3], [4]], row=1)]
    with pytest.raises(ValueError, match="rankings must all hold the same number K >= 1"):
        collate([Example(k) for k in rankings], 0)
    with pytest.raises(ValueError, match="rankings must all hold the same number K >= 1"):
        collate([Example(TokenizedRanking([1], [], row=0))], 0)
    single = collate([Example(TokenizedRanking([1], [[2, 3]], row=0))], 0).pairs  # a ranking of one
    assert single.targets.tolist() == [2, 3] and single.cu_seqlens.tolist() == [0, 2]
    with pytest.raises(ValueError, match="row 3 has an empty prompt or response"):
        collate([Example(TokenizedRanking([1], [[2], []], row=3))], 0)
