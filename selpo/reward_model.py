"""Token-level guidance's reward model: a transformer backbone with a scalar head that gives every response
token a reward, read at the token itself, i.e. after the model has seen it.

Two heads (``guidance.head``): ``linear``, selpo's, a linear layer and a sigmoid, rewards in (0, 1); and
``mlp``, the released code's (Shentao-YANG/Preference_Grounded_Guidance, ``sum_task/reward_model.py`` and
``prompt_task/rlprompt/models/reward_model.py``, their default ``use_softplus=1``), matched exactly: one hidden
layer of ``MLP_HIDDEN`` ReLU units, initialised as there (Xavier-uniform weights with gain 1e-4, every bias
-1e-4, ``sum_task/utils.py``), its output x bounded by two softplus steps, first from above by hi = 1, then from
below by lo = 1e-8: ``lo + softplus((hi - softplus(hi - x)) - lo)`` (``double_softplus``). The released code
calls this scaling "to [0,1]", but the second step lifts the top: rewards lie in (1e-8, 1e-8 + log(1 + e)), up
to about 1.3133 (x = 0 gives log(1 + sigmoid(1)), about 0.549). selpo follows the code, not the comment. One
step is left out: the released head maps a NaN reward to 0.0; selpo lets it propagate, so a NaN is seen.

It is a transformers token-classification model with one label (the head replaces its ``score`` layer, and
``config.selpo_head`` records which head it has), so it saves, loads and trains like any other model in the
pipeline (``save_pretrained``, gradient checkpointing, Accelerate).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from .batches import Example, collate, split_packed
from .body import body_states, layout_of
from .data import PairBatch, TokenizedPair, TokenizedRanking
from .distributed import map_batches
from .models import LOAD_OPTIONS, attention_implementation, load_tokenizer, resolve_model_path

HEADS = ("linear", "mlp")
MLP_HIDDEN = 2048
BOUNDS = (1e-8, 1.0)


def load_reward_model(path: str, *, device: str | torch.device = "cpu", head: str = "linear"):
    """(model, tokenizer) from a saved reward model (with the head it was saved with), or from a causal LM
    folder (or ``"default"``), whose backbone it reuses with a fresh ``head`` (one of HEADS). A LoRA adapter folder
    (``selpo.lora``: the adapter and the trained head, no base weights) is loaded onto the base it names, built
    with ``head``: the head the adapter was trained with."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    from . import lora

    if head not in HEADS:
        raise ValueError(f"guidance.head must be one of {HEADS}, got {head!r}")
    base = lora.adapter_base(path)
    if base is not None:
        model, tokenizer = load_reward_model(base, device=device, head=head)
        lora.load_adapter(model, path)
        return model, tokenizer
    tokenizer = load_tokenizer(path)
    folder = resolve_model_path(path)
    config = AutoConfig.from_pretrained(folder, num_labels=1, classifier_dropout=0.0, local_files_only=True)
    saved_head = getattr(config, "selpo_head", None)
    model = AutoModelForTokenClassification.from_pretrained(
        folder, config=config, dtype=torch.float32, attn_implementation=attention_implementation(device),
        **LOAD_OPTIONS)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.selpo_head = saved_head or head
    if model.config.selpo_head == "mlp":
        model.score = mlp_head(model.score.in_features)
        if saved_head == "mlp":
            _load_head(model, folder)
    return model.to(device), tokenizer


def mlp_head(width: int) -> torch.nn.Sequential:
    """A fresh released-code MLP head on hidden states of ``width``: its near-zero start (every output about
    -1e-4, every reward about 0.549) gives all tokens the same reward until it learns."""
    head = torch.nn.Sequential(torch.nn.Linear(width, MLP_HIDDEN), torch.nn.ReLU(), torch.nn.Linear(MLP_HIDDEN, 1))
    for layer in (head[0], head[2]):
        torch.nn.init.xavier_uniform_(layer.weight, gain=1e-4)
        torch.nn.init.constant_(layer.bias, -1e-4)
    return head


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


def double_softplus(x: torch.Tensor) -> torch.Tensor:
    """The released MLP head's bound (module docstring): a soft min with hi, then a soft max with lo."""
    lo, hi = BOUNDS
    softplus = torch.nn.functional.softplus
    return lo + softplus((hi - softplus(hi - x)) - lo)


def bound(model, x: torch.Tensor) -> torch.Tensor:
    """The head's output as token rewards: a sigmoid (linear head) or ``double_softplus`` (MLP head)."""
    if getattr(model.config, "selpo_head", "linear") == "linear":
        return torch.sigmoid(x)
    return double_softplus(x)


def token_rewards(model, pairs: PairBatch) -> torch.Tensor:
    """[N] float32 reward of each response token of ``pairs`` (packed like ``pairs.targets``), ``bound``'s range.

    The head reads the hidden state at the token's own position (``pairs.tokens``): the reward of y_t
    depends on y_t. Only those N states go through the head. The body runs in the batch's token layout.
    """
    at_tokens = body_states(model, pairs)[pairs.tokens]
    return bound(model, model.score(at_tokens).squeeze(-1).float())


@torch.no_grad()
def pair_rewards(accelerator: Accelerator, model, pairs: list[TokenizedPair | TokenizedRanking], *,
                 batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Per pair, float32 CPU (chosen, rejected) token rewards (per ranking, one tensor per response), under
    the accelerator's autocast, sharded over the processes, the body in the layout chosen for ``model``."""
    model.eval()

    def rewards(chunk: list):
        batch = collate([Example(p) for p in chunk], model.config.pad_token_id, layout_of(model)).pairs.to(
            accelerator.device)
        with accelerator.autocast():
            values = token_rewards(model, batch)
        return split_packed(values.cpu(), batch.cu_seqlens.cpu(), len(chunk[0].responses))

    return map_batches(accelerator, pairs, batch_size, rewards, desc="token rewards")
