"""Sampling responses from a causal LM, as eval and guidance do for any task and the default dataset was made."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.pairs import encode_prompt


@dataclass
class Completion:
    """A sampled response: its token ids (ending with EOS when the model stopped) and its text."""

    ids: list[int]
    text: str


@torch.inference_mode()
def sample_responses(model, tokenizer, prompts: list, *, num_samples: int = 1, max_new_tokens: int = 48,
                     temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32,
                     seed: int = 0) -> list[list[Completion]]:
    """``num_samples`` responses to each prompt (a string or a list of messages, rendered as in training).

    ``temperature=0`` decodes greedily. Prompts go in left-padded batches of about ``batch_size``
    sequences; each batch draws from its own seed (seed + batch number) without touching the global RNG,
    so the samples are fixed by (seed, batch_size).
    """
    if temperature < 0 or not 0 < top_p <= 1 or num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1, num_samples >= 1, max_new_tokens >= 1, "
                         "batch_size >= 1")
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    options = {"do_sample": False}
    if temperature > 0:
        options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    per_batch = max(1, batch_size // num_samples)
    results = []
    for b, first in enumerate(range(0, len(prompts), per_batch)):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[first:first + per_batch]]
        width = max(map(len, encoded))
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + b)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 num_return_sequences=num_samples, pad_token_id=pad, eos_token_id=eos, **options)
        for k, row in enumerate(out[:, width:].tolist()):
            ids = row[:row.index(eos) + 1] if eos in row else row
            if k % num_samples == 0:
                results.append([])
            results[-1].append(Completion(ids, tokenizer.decode(ids, skip_special_tokens=True).strip()))
    return results
