"""The released codes' selection rules, as options, each against a small hand-worked example: SePO's
``score.rule``, Selective-DPO's ``selective_dpo.rule`` and token-level guidance's ``guidance.head``."""

import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from selpo import config as config_module  # noqa: E402
from selpo.batches import Example, collate  # noqa: E402
from selpo.data import TokenizedPair  # noqa: E402
from selpo.methods import quantile_mask, selective_mask  # noqa: E402
from selpo.reward_model import double_softplus, load_reward_model, mlp_head, token_rewards  # noqa: E402
from selpo.stages.score import released_candidates, select, with_eos  # noqa: E402
from selpo.testing import tiny_model_dir, tiny_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import selpo, tiny_settings  # noqa: E402
from tiny_data import write_pairs  # noqa: E402


def cu(*lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def picked(mask, cu_seqlens):
    bounds = cu_seqlens.tolist()
    return [torch.nonzero(mask[a:b]).flatten().tolist() for a, b in zip(bounds[:-1], bounds[1:])]


# One pair: chosen of 5 tokens, rejected of 4.
SCORES = torch.tensor([9.0, 1.0, 5.0, 3.0, 2.0, -9.0, 0.0, -1.0, 4.0])
PAIR = cu(5, 4)


def test_sepo_paper_rule_selects_among_every_token():
    # k = floor(0.5 * 5) = 2 highest of chosen: 9 (0) and 5 (2); floor(0.5 * 4) = 2 lowest of rejected: -9, -1.
    assert picked(select(SCORES, PAIR, 0.5, 0.5, backend="torch"), PAIR) == [[0, 2], [0, 2]]


def test_sepo_released_rule_never_selects_the_first_token():
    # Candidates are tokens 1.. of each response: k = int(0.5 * 4) = 2 of chosen (5, 3), int(0.5 * 3) = 1
    # of rejected (-1).
    assert released_candidates(PAIR, 9).tolist() == [False] + [True] * 4 + [False] + [True] * 3
    assert picked(select(SCORES, PAIR, 0.5, 0.5, backend="torch", rule="released"), PAIR) == [[2, 3], [2]]


def test_sepo_released_rule_keeps_one_token_where_the_authors_code_gives_none():
    # ratio 0.3 of 4 tokens: the released code has k = int(0.3 * 3) = 0 and a NaN loss; selpo keeps the best one
    # candidate. A one-token response keeps its only token.
    scores, bounds = torch.tensor([7.0, 1.0, 2.0, 3.0, 5.0]), cu(4, 1)
    assert picked(select(scores, bounds, 0.3, 0.3, backend="torch", rule="released"), bounds) == [[3], [0]]
    assert picked(select(scores, bounds, 0.3, 0.3, backend="torch"), bounds) == [[0], [0]]
    with pytest.raises(ValueError, match="rule must be one of"):
        select(scores, bounds, 0.3, 0.3, rule="authors")


def test_released_rule_puts_eos_back_on_cut_responses():
    pair = TokenizedPair([1], [2, 3, 4], [5, 6], row=0, cut=(True, False))
    assert with_eos(pair, 9) == TokenizedPair([1], [2, 3, 9], [5, 6], row=0, cut=(True, False))


def test_sepo_released_rule_through_selpo_run(tmp_path):
    """`selpo run` with score.rule=released: every response's first token unselected, k = max(1, int(ratio
    * (n - 1))) (the released float arithmetic) of the best (chosen) or worst (rejected) other tokens, and cut
    responses ending in EOS."""
    settings = tiny_settings(tiny_model_dir(tmp_path), write_pairs(tmp_path / "train.jsonl", 10),
                             write_pairs(tmp_path / "test.jsonl", 3, seed=1),
                             **{"data.max_length": 40, "eval.reward": "none"})  # 22 prompt tokens: some cut
    code, _, err = selpo("run", "--run-dir", tmp_path / "run", *settings, "--set", "method=sepo",
                         "--set", "score.rule=released")
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "score" / "scored.jsonl").read_text().splitlines()]
    eos = tiny_tokenizer().eos_token_id
    for row in rows:
        for side, ratio, sign in (("chosen", 0.3, 1), ("rejected", 0.5, -1)):
            mask, scores = row[f"{side}_mask"], row[f"{side}_scores"]
            if len(mask) == 1:
                assert mask == [1]
                continue
            assert mask[0] == 0 and sum(mask) == max(1, int(ratio * (len(mask) - 1)))
            kept = [sign * s for s, m in zip(scores[1:], mask[1:]) if m]
            dropped = [sign * s for s, m in zip(scores[1:], mask[1:]) if not m]
            assert min(kept) >= max(dropped, default=-math.inf)
        for ids, cut in zip((row["chosen_ids"], row["rejected_ids"]), row["cut"]):
            assert ids[-1] == eos or not cut
    assert any(any(row["cut"]) for row in rows)


@pytest.mark.parametrize("scores, topk, quantile", [
    # q = 0.6 quantile of 5 scores: sorted position 0.6 * 4 = 2.4 -> 3 + 0.4 * (5 - 3) = 3.8; floor(0.4*5+0.6) = 2.
    ([1.0, 5.0, 3.0, 5.0, 2.0], [1, 3], [1, 3]),
    # The threshold is 4, tied by three tokens: all three are kept, where topk keeps exactly 2.
    ([4.0, 4.0, 4.0, 1.0, 0.0], [0, 1], [0, 1, 2]),
    # 4 tokens: floor(0.4*4+0.6) = 2 kept by the quantile (position 1.8 -> 2.8), floor(0.4*4) = 1 by topk.
    ([1.0, 2.0, 3.0, 4.0], [3], [2, 3]),
    # A certain token (log-prob 0, score 0) is a real token: it is kept when it scores at the threshold.
    ([0.0, 0.0, -1.0], [0], [0, 1]),
])
def test_selective_dpo_quantile_rule_by_hand(scores, topk, quantile):
    scores, bounds = torch.tensor(scores), cu(len(scores))
    assert picked(selective_mask(scores, bounds, 0.4, "topk", "torch"), bounds) == [topk]
    assert picked(selective_mask(scores, bounds, 0.4, "quantile"), bounds) == [quantile]
    n = len(scores)
    assert len(quantile) >= math.floor(0.4 * n + 0.6)


def test_quantile_rule_is_per_segment():
    scores, bounds = torch.tensor([1.0, 5.0, 3.0, 5.0, 2.0, 4.0, 4.0, 4.0, 1.0, 0.0]), cu(5, 5)
    assert picked(quantile_mask(scores, bounds, 0.4), bounds) == [[1, 3], [0, 1, 2]]


def test_rule_options_are_checked():
    config = config_module.load(None, ["score.rule=released", "selective_dpo.rule=quantile", "guidance.head=mlp"])
    assert (config.score.rule, config.selective_dpo.rule, config.guidance.head) == ("released", "quantile", "mlp")
    for key in ("score.rule", "selective_dpo.rule", "guidance.head"):
        with pytest.raises(ValueError, match=f"{key} must be one of"):
            config_module.load(None, [f"{key}=other"])


# The released head's bound by hand. Its inner step is e^(1 - softplus(1 - x)) = e / (1 + e^(1 - x)), so
# reward(x) = 1e-8 + log(1 + e^(-1e-8) e / (1 + e^(1 - x))).
def by_hand(x):
    return 1e-8 + math.log1p(math.exp(-1e-8) * math.e / (1 + math.exp(1 - x)))


@pytest.mark.parametrize("x, approx", [
    (-60.0, 1e-8),     # far below: the floor, 1e-8
    (-1.0, 0.280678),  # log(1 + e / (1 + e^2))
    (0.0, 0.548733),   # log(1 + sigmoid(1)): the fresh head's reward
    (1.0, 0.858298),   # log(1 + e / 2)
    (60.0, 1.313262),  # far above: log(1 + e), above the 1 that the released code's comment says
])
def test_guidance_released_bound_by_hand(x, approx):
    got = double_softplus(torch.tensor([x], dtype=torch.float64)).item()
    assert got == pytest.approx(by_hand(x), rel=1e-12, abs=1e-20) and got == pytest.approx(approx, rel=1e-6)
    assert 1e-8 <= got <= 1e-8 + math.log1p(math.e)


def test_guidance_released_bound_is_increasing_over_its_range():
    rewards = double_softplus(torch.linspace(-40, 40, 801, dtype=torch.float64))
    assert bool((rewards.diff() >= 0).all())
    assert rewards[0] == pytest.approx(1e-8, abs=1e-15) and rewards[-1] == pytest.approx(math.log1p(math.e))


def test_guidance_mlp_head_starts_as_released():
    torch.manual_seed(0)
    head = mlp_head(16)
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (head[0].out_features, head[2].in_features, head[2].out_features) == (2048, 2048, 1)
    # Xavier-uniform with gain 1e-4: |w| <= 1e-4 sqrt(6 / (fan_in + fan_out)); every bias -1e-4.
    assert head[0].weight.abs().max() <= 1e-4 * math.sqrt(6 / (16 + 2048))
    assert head[2].weight.abs().max() <= 1e-4 * math.sqrt(6 / (2048 + 1))
    assert bool((head[0].bias == -1e-4).all()) and bool((head[2].bias == -1e-4).all())
    with torch.no_grad():
        out = head(torch.randn(5, 16))
    torch.testing.assert_close(out, torch.full_like(out, -1e-4), rtol=0, atol=1e-7)


def test_guidance_mlp_head_is_bounded_and_saved_with_its_weights(tmp_path):
    tokenizer = tiny_tokenizer()
    model, _ = load_reward_model(tiny_model_dir(tmp_path, tokenizer=tokenizer), head="mlp")
    assert isinstance(model.score, torch.nn.Sequential) and model.score[0].out_features == 2048
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6, 7], row=0)]
    batch = collate([Example(p) for p in pairs], tokenizer.pad_token_id).pairs
    with torch.no_grad():
        model.score[2].bias.fill_(50.0)  # far above: the clamp's top, 1e-8 + log(1 + e)
        top = token_rewards(model, batch)
        model.score[2].bias.fill_(-50.0)  # far below: its bottom, 1e-8
        bottom = token_rewards(model, batch)
        model.score[2].bias.fill_(0.3)
        rewards = token_rewards(model, batch)
    torch.testing.assert_close(top, torch.full_like(top, 1e-8 + math.log1p(math.e)))
    torch.testing.assert_close(bottom, torch.full_like(bottom, 1e-8), rtol=0, atol=1e-9)
    x = model.score(model.base_model(input_ids=batch.input_ids).last_hidden_state.flatten(0, 1)[batch.positions + 1])
    softplus = torch.nn.functional.softplus
    torch.testing.assert_close(rewards, (1e-8 + softplus(1 - softplus(1 - x) - 1e-8)).squeeze(-1).detach())
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    again, _ = load_reward_model(str(tmp_path / "saved"))  # the saved head wins over the default "linear"
    assert again.config.selpo_head == "mlp"
    with torch.no_grad():
        torch.testing.assert_close(token_rewards(again, batch), rewards)
    linear, _ = load_reward_model(tiny_model_dir(tmp_path / "lin", tokenizer=tokenizer))
    assert isinstance(linear.score, torch.nn.Linear) and linear.config.selpo_head == "linear"

