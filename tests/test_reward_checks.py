"""Every ``eval.reward`` spec is checked before any work (selpo.rewards.verify_reward), and every failure, then or
when the reward is loaded or called, is a ValueError naming eval.reward, the file and what to do: a reward model
folder missing a file, a model that is not a one-label reward model, a function module that fails to import, a
function that raises or returns the wrong values."""

import importlib
import itertools
import json
import re
import shutil
import sys

import pytest

from selpo.rewards import load_reward, verify_reward
from selpo.testing import tiny_model_dir, tiny_tokenizer

MODULES = itertools.count()
CHECKS = [verify_reward, load_reward]  # before any work, and when eval or guidance loads the reward


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny one-label reward model with its tokenizer, saved whole and in shards."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    model, root = LlamaForSequenceClassification(config), tmp_path_factory.mktemp("reward_models")
    for name, shard in (("whole", "5GB"), ("sharded", "40KB")):
        model.save_pretrained(root / name, max_shard_size=shard)
        tokenizer.save_pretrained(root / name)
    return root


def folder_copy(saved, tmp_path, name="whole", *, drop=()):
    folder = tmp_path / name
    shutil.copytree(saved / name, folder)
    for file in drop:
        (folder / file).unlink()
    return folder


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Writes a reward module on sys.path; returns its name and file."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def write(source: str):
        name = f"user_reward_{next(MODULES)}"
        (tmp_path / f"{name}.py").write_text(source)
        importlib.invalidate_caches()
        names.append(name)
        return name, tmp_path / f"{name}.py"
    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_a_complete_folder_passes_without_loading_its_weights(saved, tmp_path):
    folder = folder_copy(saved, tmp_path)
    assert verify_reward(str(folder)) is None and verify_reward(str(saved / "sharded")) is None
    (folder / "model.safetensors").write_bytes(b"not weights")
    verify_reward(str(folder))
    at = re.escape(str(folder))
    with pytest.raises(ValueError, match=rf"eval.reward: the reward model in {at} does not load: .*save it again"):
        load_reward(str(folder))


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("drop", [("model.safetensors",),
                                  ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                   "chat_template.jinja")], ids=["no-weights", "config-only"])
def test_a_folder_without_weights_fails_naming_them(saved, tmp_path, check, drop):
    folder = folder_copy(saved, tmp_path, drop=drop)
    at = re.escape(str(folder))
    with pytest.raises(ValueError, match=rf"eval.reward: the reward model in {at} has no weights "
                                         r"\(model.safetensors, pytorch_model.bin, or a sharded .*copy the model"):
        check(str(folder))


@pytest.mark.parametrize("check", CHECKS)
def test_a_sharded_index_naming_a_missing_shard_fails_naming_it(saved, tmp_path, check):
    folder = folder_copy(saved, tmp_path, "sharded")
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    (folder / shards[1]).unlink()
    at = re.escape(str(folder))
    with pytest.raises(ValueError, match=rf"eval.reward: the reward model in {at}: model.safetensors.index.json "
                                         rf"lists 1 shard\(s\) that are not in the folder: {shards[1]}; copy every"):
        check(str(folder))


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("settings, labels, source", [
    ({}, 2, "id2label is absent, which means 2"),  # as transformers saves a two-label model, its default
    ({"id2label": {"0": "a", "1": "b", "2": "c"}}, 3, "id2label"),
    ({"num_labels": 3}, 3, "num_labels"),
], ids=["default-two", "id2label", "num_labels"])
def test_a_model_with_more_than_one_label_fails(saved, tmp_path, check, settings, labels, source):
    folder = folder_copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["id2label"], config["label2id"]
    (folder / "config.json").write_text(json.dumps(config | settings))
    at = re.escape(str(folder))
    with pytest.raises(ValueError, match=rf"eval.reward: the reward model in {at} has {labels} labels; a reward "
                                         rf"model has one, a scalar score \(config.json's {source}\): give a"):
        check(str(folder))


@pytest.mark.parametrize("check", CHECKS)
def test_a_causal_lm_fails_as_no_sequence_classifier(tmp_path, check):
    folder = tiny_model_dir(tmp_path)
    at = re.escape(folder)
    with pytest.raises(ValueError, match=rf"eval.reward: the reward model in {at}: config.json names the "
                                         r"architectures \['LlamaForCausalLM'\], not a sequence-classification"):
        check(folder)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("config, message", [
    ("{", "{at}/config.json is not readable JSON"),
    ('{"model_type": "no_such_type", "id2label": {"0": "score"}}',
     "the reward model in {at}: config.json's model_type 'no_such_type' has no sequence-classification model"),
    (None, "the reward model folder {at} has no config.json: give a folder saved with save_pretrained"),
], ids=["unreadable", "unknown-type", "absent"])
def test_a_folder_with_a_bad_or_no_config_fails_naming_it(saved, tmp_path, check, config, message):
    folder = folder_copy(saved, tmp_path, drop=["config.json"])
    if config is not None:
        (folder / "config.json").write_text(config)
    with pytest.raises(ValueError, match="eval.reward: " + message.format(at=re.escape(str(folder)))):
        check(str(folder))


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("drop, missing", [
    (("tokenizer.json", "tokenizer_config.json"), "tokenizer.json and tokenizer_config.json"),
    (("tokenizer.json",), r"tokenizer.json \(or TokenizersBackend's tokenizer.model\)"),
], ids=["no-tokenizer-files", "no-tokenizer-json"])
def test_a_folder_without_tokenizer_files_fails_naming_them(saved, tmp_path, check, drop, missing):
    folder = folder_copy(saved, tmp_path, drop=drop)
    at = re.escape(str(folder))
    with pytest.raises(ValueError, match=rf"eval.reward: the reward model in {at}: its tokenizer does not "
                                         rf"load: it lacks {missing}; save the reward model's own tokenizer") as error:
        check(str(folder))
    assert "sentencepiece" not in str(error.value)


@pytest.mark.parametrize("check", CHECKS)
def test_a_tokenizer_with_no_pad_nor_eos_token_fails(saved, tmp_path, check):
    folder = folder_copy(saved, tmp_path)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    del settings["pad_token"], settings["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    at = re.escape(str(folder))
    with pytest.raises(ValueError, match=rf"eval.reward: the reward model in {at}: its tokenizer has neither a pad nor "
                                         r"an eos token, so batches cannot be padded: set pad_token"):
        check(str(folder))


@pytest.mark.parametrize("source, line, raised", [
    ("def score(prompts, responses)\n    return [0.0]\n", 1, "SyntaxError: expected ':'"),
    ("import os\nraise RuntimeError('no API key')\n", 2, "RuntimeError: no API key"),
    ("import sys\nsys.exit(2)\n", 2, "SystemExit: 2"),
    ("import no_such_dependency_xyz\n", 1, "ModuleNotFoundError: No module named 'no_such_dependency_xyz'"),
], ids=["syntax", "raises", "exits", "missing-dependency"])
def test_a_module_that_fails_to_import_fails_naming_the_error_and_its_line(module, source, line, raised):
    name, file = module(source)
    at = re.escape(str(file))
    with pytest.raises(ValueError, match=rf"eval.reward: cannot import '{name}:score': importing '{name}' \(which "
                                         rf"runs its code\) raised {raised} at {at}:{line}; fix the module"):
        verify_reward(f"{name}:score")


def test_a_function_that_raises_fails_the_probe_at_its_line(module):
    name, file = module("import json\n\n\ndef score(prompts, responses):\n    return [json.loads(r) for r in "
                        "responses]\n")
    at = re.escape(str(file))
    with pytest.raises(ValueError, match=rf"eval.reward = '{name}:score' failed on 2 responses: JSONDecodeError: "
                                         rf".* at {at}:5; fix the function: .* \(a probe call before any work"):
        verify_reward(f"{name}:score")


@pytest.mark.parametrize("values, shown", [("[0.0]", r"got 1 values for 2 responses: \[0.0\]"),
                                           ("[float('nan')] * len(responses)", r"got 2 values .*\[nan, nan\]")])
def test_a_function_returning_wrong_values_fails_the_probe(module, values, shown):
    name, _ = module(f"def score(prompts, responses):\n    return {values}\n")
    with pytest.raises(ValueError, match=rf"eval.reward = '{name}:score' must return one finite number per response; "
                                         rf"{shown} \(a probe call before any work, on prompts \['Review"):
        verify_reward(f"{name}:score")


def test_a_valid_function_passes_its_probe(module):
    name, _ = module("CALLS = []\n\n\ndef score(prompts, responses):\n    CALLS.append((prompts, responses))\n"
                     "    return [float(len(r)) for r in responses]\n")
    assert verify_reward(f"{name}:score") is None
    assert [(len(p), len(r)) for p, r in sys.modules[name].CALLS] == [(2, 2)]


def test_an_exception_in_a_reward_function_names_the_spec_and_its_line(module):
    name, file = module("def score(prompts, responses):\n    return [{'short': 1.0}[r] for r in responses]\n")
    reward = load_reward(f"{name}:score")
    assert reward(["p"], ["short"]) == [1.0]
    at = re.escape(str(file))
    with pytest.raises(ValueError, match=rf"eval.reward = '{name}:score' failed on 2 responses: KeyError: 'long' at "
                                         rf"{at}:2; fix the function"):
        reward(["p", [{"role": "user", "content": "q"}]], ["short", "long"])
