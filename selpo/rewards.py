"""The ground-truth reward of sampled responses (``eval.reward``): what eval reports and what token-level
guidance ranks its retraining samples by.

- ``vader``: VADER's compound sentiment of the response, in [-1, 1] (the packaged sentiment task's reward);
- a local folder holding a sequence-classification reward model with one label
  (``AutoModelForSequenceClassification``): its score of prompt + response, rendered by its own
  tokenizer's chat template (plain concatenation when it has none), in batches, on the run's device under
  its autocast;
- ``module:function``: a Python callable ``f(prompts, responses) -> floats`` (prompts as the data holds them:
  strings or message lists; responses as decoded text), imported from ``sys.path`` and the working folder;
- ``none``: no reward (``load_reward`` returns None).

A ``module:function`` reward imports that module, which runs its code: name only code you trust.

``verify_reward`` checks a spec before any work (the pipeline calls it before its first stage), so that a reward
that cannot load or score fails then, not in eval after training; every failure, then or later, is a ValueError
naming ``eval.reward``, the file and what to do.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
import sysconfig
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

NONE, VADER = "none", "vader"
CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
KEY = "eval.reward"
PROBE_PROMPTS = ("Review a small cafe.", "Describe a quiet park.")
PROBE_RESPONSES = ("Friendly staff and good coffee.", "Green, calm and clean.")
WEIGHTS = (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json"))
LIBRARIES = tuple(Path(p).resolve() for p in {sysconfig.get_path("stdlib"), sysconfig.get_path("purelib"),
                                              sysconfig.get_path("platlib"), str(Path(__file__).parent)})


class Reward:
    """A named reward: ``reward(prompts, responses)`` gives one finite float per response."""

    def __init__(self, name: str, kind: str, fn):
        self.name, self.kind, self._fn = name, kind, fn

    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        if not responses:
            return []
        try:
            values = self._fn(prompts, responses)
        except Exception as e:
            fix = {"function": "; fix the function: selpo calls it as f(prompts, responses), prompts as the data "
                               "holds them (strings or message lists), responses as strings",
                   "model": "; if memory ran out, lower eval.batch_size (eval) or guidance.micro_batch_size "
                            "(guidance)"}.get(self.kind, "")
            raise ValueError(f"{KEY} = {self.name!r} failed on {len(responses)} responses: {_error(e)}{fix}") from e
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{KEY} = {self.name!r} must return numbers, got {type(values).__name__}: {e}") from None
        if len(values) != len(responses) or not all(map(math.isfinite, values)):
            raise ValueError(f"{KEY} = {self.name!r} must return one finite number per response; got "
                             f"{len(values)} values for {len(responses)} responses: {values[:8]}")
        return values


def describe(spec: str) -> str:
    """One line saying what ``spec`` means, for the run's log and the report."""
    if spec == VADER:
        return "VADER's compound sentiment of the response (the packaged sentiment task's reward)"
    if spec == NONE:
        return "none: no reward model or function was given, so no sampled response is scored"
    if Path(spec).expanduser().is_dir():
        return f"the reward model in {spec} on prompt + response"
    return f"the function {spec}(prompts, responses)"


def check_spec(spec: str) -> None:
    """Raises naming ``eval.reward`` when ``spec`` is none of the four kinds (nothing is imported or loaded:
    ``verify_reward`` does that)."""
    if spec in (VADER, NONE) or runs_code(spec):
        return
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{KEY}: the reward model folder {path} has no config.json: give a folder saved with "
                         "save_pretrained")
    if not (path / "config.json").is_file():
        raise ValueError(f"{KEY} must be 'vader', 'none', module:function or a local reward model folder (with "
                         f"config.json); {spec!r} is none of these")


def verify_reward(spec: str) -> None:
    """Checks, before any work, that ``spec`` will load and score, so that a run never trains and then fails in
    eval. A model folder: config.json (readable, a sequence-classification model of a type transformers knows,
    one label), its weight files (every shard its index lists; none is loaded) and its tokenizer (loaded, with a
    pad or eos token). A function: its import (any exception its module raises) and a probe call on two string
    prompts, which must give one finite float per response. ``vader`` and ``none``: ``check_spec``'s check.
    Raises ValueError naming ``eval.reward``, the file and what to do."""
    check_spec(spec)
    if spec in (VADER, NONE):
        return
    if not runs_code(spec):
        _model_tokenizer(Path(spec).expanduser())
        return
    reward = Reward(spec, "function", _import(spec))
    try:
        reward(list(PROBE_PROMPTS), list(PROBE_RESPONSES))
    except ValueError as e:
        raise ValueError(f"{e} (a probe call before any work, on prompts {list(PROBE_PROMPTS)} and responses "
                         f"{list(PROBE_RESPONSES)})") from e


def load_reward(spec: str, *, device: str | torch.device = "cpu", autocast=None, batch_size: int = 16):
    """The Reward ``spec`` names (None for ``none``); ``autocast``: a context factory for the model's forward."""
    check_spec(spec)
    if spec == NONE:
        return None
    if spec == VADER:
        from .sentiment import vader_reward

        return Reward(spec, "vader", lambda prompts, responses: vader_reward(responses))
    if runs_code(spec):
        return Reward(spec, "function", _import(spec))
    return Reward(spec, "model", _ModelReward(spec, device, autocast or nullcontext, batch_size))


def runs_code(spec: str) -> bool:
    """Whether ``spec`` is a ``module:function`` reward, whose use imports that module and so runs its code."""
    return bool(CALLABLE.fullmatch(spec)) and not Path(spec).expanduser().is_dir()


def _import(spec: str):
    """The callable ``spec`` names; importing runs its module, so any exception there (not only ImportError)
    becomes an error naming the module, the exception and the line of the user's code that raised it."""
    module_name, _, name = spec.partition(":")
    if "" not in sys.path:  # the working folder, last: a folder there never shadows an installed package
        sys.path.append("")  # (in this repository, kernels/ would hide the `kernels` that transformers imports)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # SystemExit: a script that parses its arguments on import
        missing = e.name if isinstance(e, ModuleNotFoundError) else None
        if missing and f"{module_name}.".startswith(f"{missing}."):
            raise ValueError(f"{KEY}: cannot import {spec!r}: no module named {missing!r} on sys.path: run selpo "
                             "from the folder that holds it, or add that folder to PYTHONPATH") from None
        raise ValueError(f"{KEY}: cannot import {spec!r}: importing {module_name!r} (which runs its code) raised "
                         f"{_error(e)}; fix the module") from e
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"{KEY}: cannot import {spec!r}: module {module_name!r} ({module.__file__}) has no {name!r}")
    if not callable(fn):
        raise ValueError(f"{KEY}: {spec!r} is not callable")
    return fn


def _error(error: BaseException) -> str:
    """``Type: message at file:line``, the line being the last traceback frame in the user's code (not selpo's,
    Python's or an installed package's): where a user's reward went wrong. A SyntaxError's is its own."""
    if isinstance(error, SyntaxError):
        return f"{type(error).__name__}: {error.msg} at {error.filename}:{error.lineno}"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith("<") and not any(map(Path(f.filename).resolve().is_relative_to, LIBRARIES))]
    return f"{type(error).__name__}: {error}" + (f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else "")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{KEY}: {path} is not readable JSON ({type(e).__name__}: {e}): save the reward model "
                         "again with save_pretrained") from None


def _model_tokenizer(folder: Path):
    """The tokenizer of the reward model in ``folder``, after checking what AutoModelForSequenceClassification will
    read there (config.json and the weight files, none loaded), so that a folder missing a file fails naming it."""
    from transformers import __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    where = f"{KEY}: the reward model in {folder}"
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config.json holds no settings object: save the reward model with save_pretrained")
    if config.get("model_type") not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(f"{where}: config.json's model_type {config.get('model_type')!r} has no sequence-"
                         f"classification model in transformers {__version__}: give a reward model that "
                         "AutoModelForSequenceClassification loads")
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"{where}: config.json names the architectures {architectures}, not a sequence-"
                         "classification model, so its score head would be random: give a reward model (a "
                         "...ForSequenceClassification with one label)")
    # transformers counts id2label's entries; without it, it takes num_labels, else 2
    labels, source = ((len(config["id2label"]), "id2label") if config.get("id2label") is not None else
                      (config["num_labels"], "num_labels") if "num_labels" in config else
                      (2, "id2label is absent, which means 2"))
    if labels != 1:
        raise ValueError(f"{where} has {labels} labels; a reward model has one, a scalar score (config.json's "
                         f"{source}): give a one-label reward model")
    _check_weights(folder, where)
    return _load_tokenizer(folder, where)


def _check_weights(folder: Path, where: str) -> None:
    """The weight files transformers loads, in its order of preference, are there (a sharded index: every shard)."""
    for single, index in WEIGHTS:
        if (folder / single).is_file():
            return
        if (folder / index).is_file():
            settings = _read_json(folder / index)
            weight_map = settings.get("weight_map") if isinstance(settings, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{where}: {index} lists no shards (no weight_map): save the reward model again "
                                 "with save_pretrained")
            missing = sorted({str(f) for f in weight_map.values() if not (folder / str(f)).is_file()})
            if missing:
                raise ValueError(f"{where}: {index} lists {len(missing)} shard(s) that are not in the folder: "
                                 f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}; copy every shard "
                                 "into it")
            return
    raise ValueError(f"{where} has no weights (model.safetensors, pytorch_model.bin, or a sharded "
                     "model.safetensors.index.json with its shards): copy the model's weight files into the folder, "
                     "or save the model there with save_pretrained")


def _load_tokenizer(folder: Path, where: str):
    """The folder's tokenizer, padding with eos when it has no pad token. A failure names the files AutoTokenizer
    lacks, not transformers' guess (install sentencepiece or tiktoken), which misleads when they are absent."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        missing = _missing_tokenizer_files(folder)
        problem = f"it lacks {missing}" if missing else _error(e)
        raise ValueError(f"{where}: its tokenizer does not load: {problem}; save the reward model's own tokenizer "
                         f"into the folder (tokenizer.save_pretrained)") from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{where}: its tokenizer has neither a pad nor an eos token, so batches cannot be "
                             "padded: set pad_token in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _missing_tokenizer_files(folder: Path) -> str:
    """What AutoTokenizer lacks in ``folder`` ('' when nothing): tokenizer.json, else the vocabulary files of the
    (slow) tokenizer class tokenizer_config.json names, which it would convert."""
    if (folder / "tokenizer.json").is_file():
        return ""
    if not (folder / "tokenizer_config.json").is_file():
        return "tokenizer.json and tokenizer_config.json"
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    settings = _read_json(folder / "tokenizer_config.json")
    name = settings.get("tokenizer_class") if isinstance(settings, dict) else None
    files = [f for f in getattr(tokenizer_class_from_name(name) if name else None, "vocab_files_names", {}).values()
             if f != "tokenizer.json"]
    missing = [f for f in files if not (folder / f).is_file()]
    if files and not missing:
        return ""
    return f"tokenizer.json (or {name}'s {' and '.join(missing)})" if missing else "tokenizer.json"


class _ModelReward:
    """A one-label sequence-classification model scoring rendered prompt + response texts."""

    def __init__(self, spec: str, device, autocast, batch_size: int):
        from transformers import AutoModelForSequenceClassification

        from .models import LOAD_OPTIONS

        folder = Path(spec).expanduser()
        self.tokenizer = _model_tokenizer(folder)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(folder, **LOAD_OPTIONS,
                                                                            dtype=torch.float32).to(device).eval()
        except Exception as e:
            raise ValueError(f"{KEY}: the reward model in {folder} does not load: {_error(e)}; save it again with "
                             "save_pretrained") from e
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.autocast, self.batch_size = device, autocast, batch_size

    def render(self, prompt, response: str) -> str:
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            return text + response
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        texts = [self.render(p, r) for p, r in zip(prompts, responses)]
        chat = getattr(self.tokenizer, "chat_template", None) is not None
        scores = []
        for first in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[first:first + self.batch_size], padding=True, return_tensors="pt",
                                   add_special_tokens=not chat).to(self.device)
            with self.autocast():
                logits = self.model(**batch).logits
            scores += logits[:, 0].float().cpu().tolist()
        return scores
