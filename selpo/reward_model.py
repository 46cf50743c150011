"""Token-level guidance's reward model: a transformer backbone with a scalar head that gives every response
token a reward, read at the token itself, i.e. after the model has seen it.

Two heads (``guidance.head``): ``linear``, selpo's, a linear layer and a sigmoid, rewards in (0, 1); and
``mlp``, the released code's, a ReLU MLP (``MLP_HIDDEN`` units) whose output is bounded by a double softplus,
``lo + softplus(hi - softplus(hi - x) - lo)`` with lo = 1e-8 and hi = 1 (a soft clamp, upper end first:
rewards lie in (1e-8, 1e-8 + log(1 + e)), i.e. below about 1.31, as the two softplus steps leave them).

It is a transformers token-classification model with one label (the head replaces its ``score`` layer, and
``config.selpo_head`` records which head it has), so it saves, loads and trains like any other model in the
pipeline (``save_pretrained``, gradient checkpointing, Accelerate).
"""

from __future__ import annotations

import torch

from accelerate import Accelerator

from .data import PairBatch, TokenizedPair, TokenizedRanking
from .distributed import map_batches
from .examples import Example, collate, split_packed
from .models import attention_implementation, load_tokenizer, resolve_model_path


HEADS = ("linear", "mlp")
MLP_HIDDEN = 2048
BOUNDS = (1e-8, 1.0)


def load_reward_model(path: str, *, device: str | torch.device = "cpu", head: str = "linear"):
    """(model, tokenizer) from a saved reward model (with the head it was saved with), or from a causal LM
    folder (or ``"default"``), whose backbone it reuses with a fresh ``head`` (one of HEADS)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    if head not in HEADS:
        raise ValueError(f"guidance.head must be one of {HEADS}, got {head!r}")
    tokenizer = load_tokenizer(path)
    folder = resolve_model_path(path)
    config = AutoConfig.from_pretrained(folder, num_labels=1, classifier_dropout=0.0, local_files_only=True)
    saved_head = getattr(config, "selpo_head", None)
    model = AutoModelForTokenClassification.from_pretrained(
        folder, config=config, dtype=torch.float32, local_files_only=True,
        attn_implementation=attention_implementation(device))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.selpo_head = saved_head or head
    if model.config.selpo_head == "mlp":
        width = model.score.in_features
        model.score = torch.nn.Sequential(torch.nn.Linear(width, MLP_HIDDEN), torch.nn.ReLU(),
                                          torch.nn.Linear(MLP_HIDDEN, 1))
        if saved_head == "mlp":
            _load_head(model, folder)
    return model.to(device), tokenizer


def _load_head(model, folder: str) -> None:
    """Loads the saved weights of an MLP head, which ``from_pretrained`` (expecting a linear ``score``) skips."""
    from pathlib import Path

    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update({k.removeprefix("score."): v for k, v in load_file(file).items() if k.startswith("score.")})
    missing, unexpected = model.score.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: its MLP reward head does not load (missing {missing}, unexpected {unexpected})")


def bound(model, x: torch.Tensor) -> torch.Tensor:
    """The head's output as token rewards: a sigmoid (linear head) or the double-softplus clamp (MLP head)."""
    if getattr(model.config, "selpo_head", "linear") == "linear":
        return torch.sigmoid(x)
    lo, hi = BOUNDS
    softplus = torch.nn.functional.softplus
    return lo + softplus(hi - softplus(hi - x) - lo)


def token_rewards(model, pairs: PairBatch) -> torch.Tensor:
    """[N] float32 reward of each response token of ``pairs`` (packed like ``pairs.targets``), ``bound``'s range.

    The head reads the hidden state at the token's own position (``positions + 1``): the reward of y_t
    depends on y_t. Only those N states go through the head.
    """
    hidden = model.base_model(input_ids=pairs.input_ids, attention_mask=pairs.attention_mask,
                              use_cache=False).last_hidden_state
    at_tokens = hidden.flatten(0, 1)[pairs.positions + 1]
    return bound(model, model.score(at_tokens).squeeze(-1).float())


@torch.no_grad()
def pair_rewards(accelerator: Accelerator, model, pairs: list[TokenizedPair | TokenizedRanking], *,
                 batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Per pair, float32 CPU (chosen, rejected) token rewards (per ranking, one tensor per response), under
    the accelerator's autocast, sharded over the processes."""
    model.eval()

    def rewards(chunk: list):
        batch = collate([Example(p) for p in chunk], model.config.pad_token_id).pairs.to(accelerator.device)
        with accelerator.autocast():
            values = token_rewards(model, batch)
        return split_packed(values.cpu(), batch.cu_seqlens.cpu(), len(chunk[0].responses))

    return map_batches(accelerator, pairs, batch_size, rewards)
