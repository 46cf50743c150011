"""The generation of the shipped default dataset: review prompts answered by the default model, scored by VADER."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..models import DEFAULT_MODEL, load_causal_lm
from ..progress import bar as progress_bar
from ..sampling import sample_responses
from .prompts import review_prompts
from .vader import vader_reward


def generate_default_dataset(out_dir: str | os.PathLike, n_pairs: int = 400, seed: int = 0, *, test_pairs: int = 80,
                             num_samples: int = 4, min_gap: float = 0.1, max_new_tokens: int = 48,
                             temperature: float = 1.0, top_p: float = 0.95, batch_size: int = 64,
                             model: str = DEFAULT_MODEL, device: str = "cpu", progress: bool = True) -> dict:
    """Writes the controlled-sentiment preference data: ``train.jsonl``, ``test.jsonl`` and ``meta.json``.

    For each review prompt (``review_prompts``, order fixed by ``seed``), ``num_samples`` responses are
    sampled from ``model``; the most positive by VADER is chosen and the least positive rejected, unless
    their rewards tie or differ by less than ``min_gap`` (a near tie says nothing; the prompt is skipped). The
    first ``n_pairs - test_pairs`` pairs form the train split and the rest the held-out split, so the two
    share no prompt. Rows are ``{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}``
    (strings and VADER compound scores). Returns the statistics also written to ``meta.json``.
    """
    if not 0 < test_pairs < n_pairs:
        raise ValueError(f"need 0 < test_pairs < n_pairs, got test_pairs={test_pairs}, n_pairs={n_pairs}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to form a pair, got {num_samples}")
    start = time.perf_counter()
    lm, tokenizer = load_causal_lm(model, device=device)
    prompts = review_prompts(seed=seed)
    per_batch = max(1, batch_size // num_samples)
    rows, lengths, bar = [], [], progress_bar(n_pairs, "pairs", show=progress, leave=True)
    for b, first in enumerate(range(0, len(prompts), per_batch)):
        chunk = prompts[first:first + per_batch]
        samples = sample_responses(lm, tokenizer, chunk, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, batch_size=batch_size,
                                   seed=seed * 100_003 + b)
        for prompt, completions in zip(chunk, samples):
            completions = [c for c in completions if c.text]
            rewards = vader_reward([c.text for c in completions])
            gap = max(rewards, default=0.0) - min(rewards, default=0.0)
            if len(completions) < 2 or gap == 0 or gap < min_gap:
                continue
            hi, lo = rewards.index(max(rewards)), rewards.index(min(rewards))
            rows.append({"prompt": prompt, "chosen": completions[hi].text, "rejected": completions[lo].text,
                         "chosen_reward": rewards[hi], "rejected_reward": rewards[lo]})
            lengths += [len(completions[hi].ids), len(completions[lo].ids)]
            bar.update(1)
        if len(rows) >= n_pairs:
            break
    bar.close()
    if len(rows) < n_pairs:
        raise ValueError(f"only {len(rows)} of {n_pairs} pairs from all {len(prompts)} prompts; "
                         "lower min_gap or n_pairs")
    rows, lengths = rows[:n_pairs], lengths[:2 * n_pairs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = n_pairs - test_pairs
    for name, part in (("train", rows[:split]), ("test", rows[split:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    gaps = [r["chosen_reward"] - r["rejected_reward"] for r in rows]
    meta = {
        "command": f"python -m selpo.sentiment --out {out_dir} --pairs {n_pairs} --test {test_pairs} --seed {seed} "
                   f"--samples {num_samples} --min-gap {min_gap} --max-new-tokens {max_new_tokens} "
                   f"--batch-size {batch_size}",
        "model": model, "seed": seed, "train_pairs": split, "test_pairs": test_pairs, "num_samples": num_samples,
        "min_gap": min_gap, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "batch_size": batch_size, "prompts_used": first + len(chunk),
        "mean_response_tokens": round(sum(lengths) / len(lengths), 2),
        "mean_chosen_reward": round(sum(r["chosen_reward"] for r in rows) / n_pairs, 4),
        "mean_rejected_reward": round(sum(r["rejected_reward"] for r in rows) / n_pairs, 4),
        "mean_reward_gap": round(sum(gaps) / n_pairs, 4),
        "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
