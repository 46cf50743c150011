"""benchmarks/dialogue_data.py: the generated dialogue set has the shape it promises (prompt share, turns, response
lengths, caps), is the same for a seed, and tokenizes back to its own ids from text (what lets TRL take it)."""

import os
import re

import pytest

from selpo.models import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = 800


@pytest.fixture(scope="module")
def generator():
    with pytest.MonkeyPatch.context() as patch:  # the repository root on the path only while importing
        patch.syspath_prepend(REPO)
        from benchmarks import dialogue_data
    return dialogue_data


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


@pytest.fixture(scope="module")
def made(generator, tokenizer):
    return generator.dialogues(tokenizer, PAIRS, seed=0)


def test_prompts_are_60_to_70_percent_of_the_tokens(generator, made):
    prompts = sum(len(d.pair.prompt_ids) for d in made)
    responses = sum(len(d.pair.chosen_ids) + len(d.pair.rejected_ids) for d in made)
    share = prompts / (prompts + responses)
    assert 0.60 <= share <= 0.70
    assert generator.describe(made)["prompt_share"] == pytest.approx(share)


def test_prompts_alternate_two_to_five_turns_and_end_on_a_user_turn(made, tokenizer):
    assert {d.turns for d in made} == {2, 3, 4, 5}
    for d in made[:100]:
        roles = re.findall(r"<\|im_start\|>(\w+)", tokenizer.decode(d.pair.prompt_ids))
        if roles[0] == "system":
            roles = roles[1:]
        # user, assistant, ..., user, then the generation prompt's assistant header
        assert roles == ["user", "assistant"] * d.turns


def test_response_lengths_spread_from_10_to_300_tokens(made, tokenizer):
    lengths = [len(r) for d in made for r in d.pair.responses]
    assert min(lengths) >= 10 and max(lengths) <= 300
    assert sum(n < 30 for n in lengths) / len(lengths) > 0.2 and sum(n > 200 for n in lengths) / len(lengths) > 0.05
    assert all(r[-1] == tokenizer.eos_token_id for d in made for r in d.pair.responses)


def test_pairs_keep_the_caps(generator, made):
    shape = generator.DialogueShape()
    assert max(len(d.pair.prompt_ids) for d in made) <= shape.max_prompt
    assert max(len(d.pair.prompt_ids) + len(r) for d in made for r in d.pair.responses) <= shape.max_length
    # Some dialogues drew more than fit and lost early exchanges: the caps are reached, not merely respected.
    assert max(len(d.pair.prompt_ids) for d in made) > shape.max_prompt - 50


def test_a_seed_gives_the_same_pairs_and_another_seed_others(generator, made, tokenizer):
    assert generator.dialogues(tokenizer, 20, seed=0) == made[:20]
    other = generator.dialogues(tokenizer, 20, seed=1)
    assert [d.pair.prompt_ids for d in other] != [d.pair.prompt_ids for d in made[:20]]


def test_text_tokenizes_back_to_the_same_ids(made, tokenizer):
    """A trainer that takes text (TRL) gets the generated ids from the decoded prompt and responses."""
    for d in made[:50]:
        for ids in (d.pair.prompt_ids, d.pair.chosen_ids[:-1], d.pair.rejected_ids[:-1]):
            assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_the_cpu_runs_half_shape_keeps_the_prompt_share(generator, tokenizer):
    """``--dialogue half`` (the CPU benchmark's): half the lengths, the same 60-70% of the tokens in prompts."""
    made = generator.dialogues(tokenizer, PAIRS, seed=0, shape=generator.SHAPES["half"])
    stats = generator.describe(made)
    assert 0.60 <= stats["prompt_share"] <= 0.70 and set(stats["turns"]) == {2, 3, 4, 5}
    assert stats["response_tokens"]["min"] >= 5 and stats["response_tokens"]["max"] <= 150
    assert stats["longest_sequence"] <= 512
