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
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

NONE, VADER = "none", "vader"
CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
KEY = "eval.reward"


class Reward:
    """A named reward: ``reward(prompts, responses)`` gives one finite float per response."""

    def __init__(self, name: str, kind: str, fn):
        self.name, self.kind, self._fn = name, kind, fn

    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        if not responses:
            return []
        values = self._fn(prompts, responses)
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


def check_spec(spec: str, *, import_callable: bool = False) -> None:
    """Raises naming ``eval.reward`` when ``spec`` is none of the four kinds, or (``import_callable``) names a
    function that cannot be imported: checked before any work is done."""
    if spec in (VADER, NONE):
        return
    if CALLABLE.fullmatch(spec) and not Path(spec).expanduser().is_dir():
        if import_callable:
            _import(spec)
        return
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"{KEY} must be 'vader', 'none', module:function or a local reward model folder (with "
                         f"config.json); {spec!r} is none of these")


def load_reward(spec: str, *, device: str | torch.device = "cpu", autocast=None, batch_size: int = 16):
    """The Reward ``spec`` names (None for ``none``); ``autocast``: a context factory for the model's forward."""
    check_spec(spec)
    if spec == NONE:
        return None
    if spec == VADER:
        from .sentiment import vader_reward

        return Reward(spec, "vader", lambda prompts, responses: vader_reward(responses))
    if CALLABLE.fullmatch(spec) and not Path(spec).expanduser().is_dir():
        return Reward(spec, "function", _import(spec))
    return Reward(spec, "model", _ModelReward(spec, device, autocast or nullcontext, batch_size))


def _import(spec: str):
    module_name, _, name = spec.partition(":")
    if "" not in sys.path:  # the working folder, as `python -m` has it
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{KEY}: cannot import {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{KEY}: {spec!r} is not callable")
    return fn


class _ModelReward:
    """A one-label sequence-classification model scoring rendered prompt + response texts."""

    def __init__(self, folder: str, device, autocast, batch_size: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True,
                                                                        dtype=torch.float32).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{KEY}: the reward model in {folder} has {self.model.config.num_labels} labels; a "
                             "reward model has one (a scalar score)")
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
