"""The files stages pass to each other: JSON Lines of pairs (plus per-token values), written atomically."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..atomic import write_text_atomic
from ..data import TokenizedPair


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def pair_row(pair: TokenizedPair, **values) -> dict:
    """A pair as a JSON row, with extra per-pair values (e.g. per-token scores as lists)."""
    return {**asdict(pair), **values}


def row_pair(row: dict) -> TokenizedPair:
    return TokenizedPair(prompt_ids=row["prompt_ids"], chosen_ids=row["chosen_ids"],
                         rejected_ids=row["rejected_ids"], row=row["row"], cut=tuple(row.get("cut", (False, False))))
