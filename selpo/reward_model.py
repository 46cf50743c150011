"""Token-level guidance's reward model: a transformer backbone with a scalar head that gives every response
token a reward in (0, 1) (the sigmoid of the head), read at the token itself, i.e. after the model has seen it.

It is a transformers token-classification model with one label, so it saves, loads and trains like any
other model in the pipeline (``save_pretrained``, gradient checkpointing, Accelerate).
"""

from __future__ import annotations

import torch

from accelerate import Accelerator

from .data import PairBatch, TokenizedPair, TokenizedRanking
from .distributed import map_batches
from .examples import Example, collate, split_packed
from .models import attention_implementation, load_tokenizer, resolve_model_path


def load_reward_model(path: str, *, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a saved reward model, or from a causal LM folder (or ``"default"``), whose
    backbone it reuses with a fresh scalar head."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    tokenizer = load_tokenizer(path)
    folder = resolve_model_path(path)
    config = AutoConfig.from_pretrained(folder, num_labels=1, classifier_dropout=0.0, local_files_only=True)
    model = AutoModelForTokenClassification.from_pretrained(
        folder, config=config, dtype=torch.float32, local_files_only=True,
        attn_implementation=attention_implementation(device))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def token_rewards(model, pairs: PairBatch) -> torch.Tensor:
    """[N] float32 reward of each response token of ``pairs`` (packed like ``pairs.targets``), in (0, 1).

    The head reads the hidden state at the token's own position (``positions + 1``): the reward of y_t
    depends on y_t. Only those N states go through the head.
    """
    hidden = model.base_model(input_ids=pairs.input_ids, attention_mask=pairs.attention_mask,
                              use_cache=False).last_hidden_state
    at_tokens = hidden.flatten(0, 1)[pairs.positions + 1]
    return torch.sigmoid(model.score(at_tokens).squeeze(-1).float())


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
