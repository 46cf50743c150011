"""selpo.sentiment: VADER reward and key tokens, the prompts, sampling, and the default dataset."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from selpo.data import default_data_path, load_preference_dataset, tokenize_pairs  # noqa: E402
from selpo.models import load_causal_lm  # noqa: E402
from selpo.sampling import sample_responses  # noqa: E402
from selpo.sentiment import generate as generate_module  # noqa: E402
from selpo.sentiment import (  # noqa: E402
    generate_default_dataset,
    key_token_mask,
    review_prompts,
    sentiment_word_mask,
    sentiment_word_spans,
    vader_reward,
)
from selpo.sentiment.__main__ import main  # noqa: E402
from selpo.testing import tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_vader_reward_is_the_compound_score():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["What a wonderful, lovely place!", "The food was awful and the staff rude.", "It is a chair."]
    rewards = vader_reward(texts)
    assert rewards == [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts]
    assert rewards[0] > 0.5 and rewards[1] < -0.5 and rewards[2] == 0
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        vader_reward("one string")
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        vader_reward([1])


def test_sentiment_words_are_found_as_vader_splits_them():
    text = "The food was GREAT, but (sadly) the service was awful!!! :) ok, fine."
    words = [text[a:b] for a, b in sentiment_word_spans(text)]
    # "ok," keeps its comma in VADER (stripping would leave two letters), so it is no lexicon word there.
    assert words == ["GREAT", "sadly", "awful", ":)", "fine"]
    assert sentiment_word_spans("") == [] and sentiment_word_spans("a table and a chair") == []
    with pytest.raises(TypeError, match="text must be a string"):
        sentiment_word_spans(None)


def test_sentiment_word_mask_marks_overlapping_tokens():
    text = "so happy today"
    offsets = [(0, 2), (2, 3), (3, 8), (8, 14), (0, 0)]
    assert sentiment_word_mask(text, offsets) == [False, False, True, False, False]
    assert sentiment_word_mask(text, [(2, 4), (7, 9), (8, 9)]) == [True, True, False]


def test_key_token_mask_follows_the_decoded_text(tiny):
    _, tokenizer = load_causal_lm(tiny)
    text = "Great zoo, but the lovely tigers looked sad.<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    mask = key_token_mask(tokenizer, ids)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "".join(pieces) == text
    spans = sentiment_word_spans(text)
    start = 0
    for piece, marked in zip(pieces, mask):
        end = start + len(piece)
        assert marked == any(a < end and start < b for a, b in spans), piece
        start = end
    assert [p for p, m in zip(pieces, mask) if m] and not mask[-1]
    assert key_token_mask(tokenizer, []) == []


def test_review_prompts_are_distinct_neutral_and_seeded():
    everything = review_prompts()
    assert len(everything) == len(set(everything)) > 500
    assert set(vader_reward(everything)) == {0.0}
    assert review_prompts(20, seed=1) == review_prompts(20, seed=1) != review_prompts(20, seed=2)
    with pytest.raises(ValueError, match=r"n must be an int in \[0, "):
        review_prompts(len(everything) + 1)


def test_sampling_is_seeded_and_left_padding_is_transparent(tiny):
    model, tokenizer = load_causal_lm(tiny)
    prompts = ["Review a zoo.", [{"role": "user", "content": "Give a brief opinion of a theme park in Paris."}]]
    a = sample_responses(model, tokenizer, prompts, num_samples=3, max_new_tokens=5, seed=4)
    assert a == sample_responses(model, tokenizer, prompts, num_samples=3, max_new_tokens=5, seed=4)
    assert a != sample_responses(model, tokenizer, prompts, num_samples=3, max_new_tokens=5, seed=5)
    assert [len(group) for group in a] == [3, 3]
    for c in a[0] + a[1]:
        assert 1 <= len(c.ids) <= 5 and c.text == tokenizer.decode(c.ids, skip_special_tokens=True).strip()
        assert tokenizer.eos_token_id not in c.ids[:-1]
    # Greedy answers do not depend on the batch a prompt shares (left padding is masked).
    together = sample_responses(model, tokenizer, prompts, temperature=0, max_new_tokens=6)
    alone = [sample_responses(model, tokenizer, [p], temperature=0, max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    with pytest.raises(ValueError, match="need temperature >= 0"):
        sample_responses(model, tokenizer, prompts, temperature=-1)


def test_generated_dataset_files(tiny, tmp_path, monkeypatch):
    """Mechanics of the generation on the tiny model, with text length standing in for VADER (random tokens
    rarely form lexicon words); the shipped data's rewards are checked against VADER below."""
    monkeypatch.setattr(generate_module, "vader_reward", lambda texts: [len(t) / 100 for t in texts])
    meta = generate_default_dataset(tmp_path / "a", n_pairs=6, seed=3, test_pairs=2, num_samples=3, min_gap=0.02,
                                    max_new_tokens=6, batch_size=6, model=tiny, progress=False)
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (4, 2) and (meta["train_pairs"], meta["test_pairs"]) == (4, 2)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train + test:
        assert r["chosen_reward"] == len(r["chosen"]) / 100 and r["rejected_reward"] == len(r["rejected"]) / 100
        assert r["chosen_reward"] - r["rejected_reward"] >= 0.02
    assert json.loads((tmp_path / "a" / "meta.json").read_text()) == meta
    assert meta["mean_reward_gap"] == pytest.approx(sum(r["chosen_reward"] - r["rejected_reward"]
                                                        for r in train + test) / 6, abs=1e-4)
    _, tokenizer = load_causal_lm(tiny)
    _, report = tokenize_pairs(load_preference_dataset(tmp_path / "a" / "train.jsonl"), tokenizer, max_length=64)
    assert report.kept == 4
    # The command line regenerates the same files from the same seed.
    main(["--out", str(tmp_path / "b"), "--pairs", "6", "--test", "2", "--seed", "3", "--samples", "3",
          "--max-new-tokens", "6", "--batch-size", "6", "--min-gap", "0.02", "--model", tiny, "--quiet"])
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    with pytest.raises(ValueError, match="need 0 < test_pairs < n_pairs"):
        generate_default_dataset(tmp_path / "c", n_pairs=4, test_pairs=4, model=tiny)
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        generate_default_dataset(tmp_path / "c", n_pairs=4, test_pairs=1, num_samples=1, model=tiny)


def test_shipped_default_dataset():
    with open(os.path.join(os.path.dirname(default_data_path("train")), "meta.json")) as f:
        meta = json.load(f)
    splits = {s: load_preference_dataset(default_data_path(s)).to_list() for s in ("train", "test")}
    assert (len(splits["train"]), len(splits["test"])) == (meta["train_pairs"], meta["test_pairs"]) == (320, 80)
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["test"]}
    rows = splits["train"] + splits["test"]
    assert [r["chosen_reward"] for r in rows] == vader_reward([r["chosen"] for r in rows])
    assert [r["rejected_reward"] for r in rows] == vader_reward([r["rejected"] for r in rows])
    assert all(r["chosen_reward"] - r["rejected_reward"] >= meta["min_gap"] for r in rows)
    assert sum(os.path.getsize(default_data_path(s)) for s in ("train", "test")) < 1_000_000
