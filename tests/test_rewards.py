"""The pluggable ground-truth reward (selpo.rewards, ``eval.reward``): its four kinds, and the pipeline on
implicit-prompt dialogue data with a reward model folder, a function and none, through `selpo run`."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from selpo import config as config_module  # noqa: E402
from selpo.rewards import load_reward  # noqa: E402
from selpo.stages import Context  # noqa: E402
from selpo.stages.eval import win_rate  # noqa: E402
from selpo.stages.pipeline import announce_reward  # noqa: E402
from selpo.testing import tiny_model_dir, tiny_tokenizer  # noqa: E402
from selpo.trainer import make_accelerator  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import selpo, tiny_settings  # noqa: E402
from tiny_data import write_implicit_pairs  # noqa: E402

REWARD_MODULE = '''
CALLS = []


def length(prompts, responses):
    CALLS.append(len(responses))
    return [float(len(r)) for r in responses]


def short(prompts, responses):
    return [1.0]
'''


def reward_model_dir(root: Path, labels: int = 1) -> str:
    """A tiny random sequence-classification reward model (Llama, ChatML tokenizer), one label unless told."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=labels,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = root / f"reward-model-{labels}"
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_module")
    (root / "user_reward.py").write_text(REWARD_MODULE)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop("user_reward", None)


def test_vader_and_none():
    vader = load_reward("vader")
    assert vader.kind == "vader" and vader(["p", "p"], ["I love it", "I hate it"])[0] > 0 > \
        vader(["p", "p"], ["I love it", "I hate it"])[1]
    assert load_reward("none") is None


def test_a_function_is_called_with_prompts_and_responses(module_dir):
    reward = load_reward("user_reward:length")
    assert reward([[{"role": "user", "content": "hi"}], "p"], ["abc", "a"]) == [3.0, 1.0]
    with pytest.raises(ValueError, match=r"eval.reward = 'user_reward:short' must return one finite number per "
                                         r"response; got 1 values for 2 responses"):
        load_reward("user_reward:short")(["p", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="eval.reward: cannot import 'user_reward:absent'"):
        load_reward("user_reward:absent")


def test_a_function_that_cannot_be_imported_fails_before_any_work(tmp_path):
    code, _, err = selpo("run", "--run-dir", tmp_path / "run", "--set", "eval.reward=no_such_module:score")
    assert code == 1 and "eval.reward: cannot import 'no_such_module:score'" in err
    assert not (tmp_path / "run" / "data").exists()


@pytest.mark.parametrize("spec", ["sentiment", "no/such/folder", "a:b:c"])
def test_a_bad_spec_fails_at_configuration_naming_the_key(spec):
    with pytest.raises(ValueError, match="eval.reward must be 'vader', 'none', module:function or a local reward"):
        config_module.load(None, [f"eval.reward={spec}"])


def test_a_reward_model_scores_rendered_prompt_and_response_in_batches(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = reward_model_dir(tmp_path)
    prompts = ["Review a zoo.", [{"role": "user", "content": "Review a gym, please, in a few words."}], "Hi"]
    responses = ["Great!", "Friendly staff and clean rooms.", "A long answer with many words in it."]
    batched = load_reward(folder, batch_size=3)(prompts, responses)
    one_by_one = [load_reward(folder, batch_size=1)([p], [r])[0] for p, r in zip(prompts, responses)]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(one_by_one), rtol=0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant",
                                          "content": responses[2]}], tokenize=False)
    with torch.no_grad():
        expected = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
    assert abs(batched[2] - float(expected)) < 1e-5
    with pytest.raises(ValueError, match="has 2 labels; a reward model has one"):
        load_reward(reward_model_dir(tmp_path, labels=2))


def test_win_rate_counts_ties_half():
    result = win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0])
    wins = torch.tensor([1.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    assert result == {"rate": 0.625, "stderr": float(wins.std() / 2)}


def test_a_run_on_user_data_names_its_reward_before_any_work(tmp_path, capsys):
    config = config_module.load(None, ["data.train=mine.jsonl", "run_dir=" + str(tmp_path)])
    announce_reward(Context(config, make_accelerator(config)))
    assert "eval.reward: VADER's compound sentiment" in capsys.readouterr().out
    config = config_module.load(None, ["run_dir=" + str(tmp_path)])
    announce_reward(Context(config, make_accelerator(config)))
    assert capsys.readouterr().out == ""  # the packaged sentiment task: VADER is its reward


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("dialogue")
    train, test = write_implicit_pairs(root / "train.jsonl", 20), write_implicit_pairs(root / "test.jsonl", 6, seed=1)
    return root, tiny_settings(tiny_model_dir(root), train, test, **{"data.max_length": 96})


def _run(root, settings, name, *more):
    run_dir = root / name
    code, out, err = selpo("run", "--run-dir", run_dir, *settings, *more)
    assert code == 0, err[-3000:]
    return run_dir, out, json.loads((run_dir / "eval" / "results.json").read_text())


def test_run_with_a_reward_model_reports_reward_and_win_rate(dialogue):
    root, settings = dialogue
    folder = reward_model_dir(root)
    run_dir, out, results = _run(root, settings, "rm", "--set", "method=dpo", "--set", f"eval.reward={folder}")
    assert out.index(f"eval.reward: the reward model in {folder}") < out.index("== data")
    report = json.loads((run_dir / "data" / "report.json").read_text())
    assert report["train"]["kept"] == 20  # every implicit-prompt row became a pair
    assert results["reward"]["spec"] == folder and "selection" not in results
    assert 0 <= results["win_rate"]["rate"] <= 1 and results["win_rate"]["stderr"] >= 0
    samples = [json.loads(line) for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    assert all(isinstance(s["policy_reward"], float) for s in samples)
    assert samples[0]["prompt"].endswith("\n\nAssistant:")
    assert f"reward (mean of {folder})" in out and "win rate over the initial model's samples" in out
    assert "held-out margin, implicit reward" in out


def test_guidance_ranks_its_samples_by_a_function(dialogue, module_dir):
    import user_reward

    root, settings = dialogue
    user_reward.CALLS.clear()
    run_dir, out, results = _run(root, settings, "fn", "--set", "method=guidance",
                                 "--set", "eval.reward=user_reward:length")
    assert (run_dir / "train" / "rewards" / "round-1" / "DONE.json").is_file()
    assert 3 in user_reward.CALLS  # guidance.samples = 3 samples of a prompt, ranked in one call
    assert results["policy"]["reward"] > 0 and "win_rate" in results
    assert "reward (mean of user_reward:length)" in out


def test_guidance_ranks_its_samples_by_a_reward_model(dialogue, monkeypatch):
    """Each retraining ranking is its K samples best first by the reward model's scores, which are that model's
    own scores of prompt + sample (batched on the run's device as on their own)."""
    from selpo.data import TokenizedRanking
    from selpo.methods import guidance

    root, settings = dialogue
    folder = reward_model_dir(root)
    calls, rankings = [], []
    real_load, real_train = guidance.load_reward, guidance.train

    def recording_load(spec, **options):
        reward = real_load(spec, **options)

        def record(prompts, responses):
            values = reward(prompts, responses)
            calls.append((reward.kind, prompts, responses, values))
            return values
        return record

    def recording_train(accelerator, model, tokenizer, method, examples, *args, **kwargs):
        rankings.extend(e.pair for e in examples if isinstance(e.pair, TokenizedRanking))
        return real_train(accelerator, model, tokenizer, method, examples, *args, **kwargs)

    monkeypatch.setattr(guidance, "load_reward", recording_load)
    monkeypatch.setattr(guidance, "train", recording_train)
    run_dir, out, results = _run(root, settings, "guidance-rm", "--set", "method=guidance",
                                 "--set", f"eval.reward={folder}")
    assert (run_dir / "train" / "rewards" / "round-1" / "DONE.json").is_file()
    assert len(rankings) == len(calls) == 4  # guidance.prompts, one reward call of guidance.samples = 3 each
    tokenizer, own = tiny_tokenizer(), load_reward(folder, batch_size=1)
    for (kind, prompts, texts, values), ranking in zip(calls, rankings):
        assert kind == "model" and len(texts) == 3
        assert values == pytest.approx(own(prompts, texts), abs=1e-5)
        best_first = sorted(range(3), key=lambda k: -values[k])
        assert [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in ranking.responses] == \
            [texts[k] for k in best_first]
    assert results["reward"]["spec"] == folder and "win_rate" in results
    assert f"reward (mean of {folder})" in out


def test_run_without_reward_says_so_and_reports_the_rest(dialogue):
    root, settings = dialogue
    run_dir, out, results = _run(root, settings, "none", "--set", "eval.reward=none")
    assert results["policy"]["reward"] is None and results["initial"]["reward"] is None
    assert "win_rate" not in results and "selection" not in results
    assert "reward: none given (eval.reward = none), samples not scored" in out
    for key in ("kl", "implicit_accuracy", "likelihood_accuracy", "implicit_margin", "logp_margin", "token_share"):
        assert results["policy"][key] is not None, key
    page = (run_dir / "report.html").read_text()
    assert "no reward model or function was given" in page
