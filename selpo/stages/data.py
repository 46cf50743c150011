"""Stage ``data``: every row of the training and held-out data validated and tokenized once, before any
training, so a bad row is reported (or, with ``data.strict``, raises naming the file and the row as the file
numbers it, e.g. its line) in seconds, never hours into a run. The rules are in ``selpo.data.pairs``."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_text_atomic
from ..context import Context, pair_row, write_jsonl
from ..data import default_data_path, load_preference_dataset, tokenize_pairs
from ..data.formats import is_unpaired, pair_unpaired, row_prompt
from ..data.load import is_cached_name
from ..models import load_tokenizer

SPLITS = ("train", "test")
# Training pairs of the packaged data used when data.max_train_pairs is none: all 320 would take `selpo run`
# on the embedded default past 10 minutes on 2 CPU cores.
DEFAULT_TRAIN_PAIRS = 240


def source_path(value: str, split: str) -> str:
    """The file or folder behind ``data.train`` / ``data.test`` ("default": the packaged split); a cached
    dataset's name without ``:split`` reads the split of the same name."""
    if value == "default":
        return default_data_path(split)
    if not Path(value).expanduser().exists() and is_cached_name(value) and ":" not in value:
        return f"{value}:{split}"
    return value


def distinct_prompts(dataset, pairs) -> list[dict]:
    """The raw prompts of the kept pairs (for sampling: held-out ones in eval, training ones in guidance's
    retraining rounds), each once, in data order."""
    seen, rows = set(), []
    for pair in pairs:
        prompt = row_prompt(dataset[pair.row])
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append({"row": pair.row, "prompt": prompt})
    return rows


def run(ctx: Context) -> dict:
    cfg = ctx.config.data
    tokenizer = load_tokenizer(ctx.config.model)
    out = ctx.stage_dir("data")
    summary = {}
    for split, value, limit in (("train", cfg.train, cfg.max_train_pairs), ("test", cfg.test, cfg.max_test_pairs)):
        source = source_path(value, split)
        dataset = load_preference_dataset(source)
        if is_unpaired(dataset.column_names):
            dataset, left = pair_unpaired(dataset, source)
            ctx.print(f"{split}: {len(dataset)} pairs formed from the unpaired rows of {source} ({left} rows left "
                      "without a partner of the other label)")
        if limit is None and split == "train" and value == "default":
            limit = DEFAULT_TRAIN_PAIRS
            ctx.print(f"train: the packaged data's first {limit} of {len(dataset)} pairs (data.max_train_pairs)")
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        pairs, report = tokenize_pairs(dataset, tokenizer, max_length=cfg.max_length,
                                       max_prompt_length=min(cfg.max_prompt_length, cfg.max_length), source=source,
                                       strict=cfg.strict)
        ctx.print(report.summary())
        summary[split] = report.to_dict()
        if ctx.accelerator.is_main_process:
            write_jsonl(ctx.pairs_path(split), [pair_row(p) for p in pairs])
            write_jsonl(ctx.prompts_path(split), distinct_prompts(dataset, pairs))
    if ctx.accelerator.is_main_process:
        write_text_atomic(out / "report.json", json.dumps(summary, indent=1))
    return {split: {k: summary[split][k] for k in ("rows", "kept", "truncated", "dropped")} for split in SPLITS}

