"""What every stage and method is handed (``Context``), and the files stages leave in the run folder for each other.

Stages talk only through these files: a stage reads what an earlier one wrote (the tokenized pairs and
prompts of ``data``, the scored pairs of ``score``, the model folder of ``oracle``, ``guidance`` or ``train``,
any stage's ``DONE.json`` with its summary), never another stage's code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import write_text_atomic
from .run_folder import RunFolder

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .config import RunConfig
    from .data import TokenizedPair

DONE = "DONE.json"  # written last by every stage (and every piece of work kept to be reused): its fingerprint


def mark_done(folder: Path, record: dict) -> None:
    """Writes ``folder/DONE.json`` holding ``record`` (with its ``fingerprint``), atomically. The last act of a
    piece of work: until it exists, whatever else is in ``folder`` counts as unfinished."""
    write_text_atomic(folder / DONE, json.dumps(record, indent=1))


def read_done(folder: Path, fingerprint: str | None = None) -> dict | None:
    """The DONE record in ``folder``, or None: there is none, or (given ``fingerprint``) it carries another one."""
    path = folder / DONE
    record = json.loads(path.read_text()) if path.is_file() else None
    return record if record is None or fingerprint is None or record["fingerprint"] == fingerprint else None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def pair_row(pair: TokenizedPair, **values) -> dict:
    """A pair as a JSON row, with extra per-pair values (e.g. per-token scores as lists)."""
    return {**asdict(pair), **values}


def row_pair(row: dict) -> TokenizedPair:
    from .data import TokenizedPair  # here: selpo.data brings torch, which the pipeline's bookkeeping does without

    return TokenizedPair(prompt_ids=row["prompt_ids"], chosen_ids=row["chosen_ids"],
                         rejected_ids=row["rejected_ids"], row=row["row"], cut=tuple(row.get("cut", (False, False))))


@dataclass
class Context:
    """The configuration, the accelerator (processes, device, precision: one per process, shared by every
    stage and every training), and the run folder's files (``folder``: what selpo may write there).
    ``shared_root``: the folder ``selpo compare`` keeps the stages its runs share in, which their stage
    folders link to (None elsewhere: no stage folder may link out of the run folder)."""

    config: RunConfig
    accelerator: Accelerator
    shared_root: Path | None = None

    @cached_property
    def folder(self) -> RunFolder:
        return RunFolder(self.config.run_dir, shared_root=self.shared_root)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def load_causal_lm(self, path: str):
        """(model, tokenizer) of ``path`` (``selpo.models.load_causal_lm``) on the run's device, the token layout
        of its body chosen (``_choose_layout``)."""
        from .models import load_causal_lm  # here: it brings torch, which the bookkeeping does without

        model, tokenizer = load_causal_lm(path, device=self.accelerator.device)
        self._choose_layout(model, path)
        return model, tokenizer

    def load_reward_model(self, path: str, **options):
        """(model, tokenizer): ``selpo.reward_model.load_reward_model`` as ``load_causal_lm``."""
        from .reward_model import load_reward_model

        model, tokenizer = load_reward_model(path, device=self.accelerator.device, **options)
        self._choose_layout(model, path)
        return model, tokenizer

    def _choose_layout(self, model, name: str) -> None:
        """``data.packing`` for ``model``'s body where it passes ``selpo.packing_check``, else padded, said."""
        from .packing_check import choose_layout

        fallback = choose_layout(model, self.config.data.packing)
        if fallback is not None:
            self.print(f"data.packing: {name} runs {fallback}")

    def pairs_path(self, split: str) -> Path:
        """The ``data`` stage's tokenized pairs of ``split`` ("train" or "test")."""
        return self.stage_dir("data") / f"{split}.jsonl"

    def prompts_path(self, split: str) -> Path:
        """The ``data`` stage's distinct raw prompts of ``split``, in data order."""
        return self.stage_dir("data") / f"{split}_prompts.jsonl"

    def scored_path(self) -> Path:
        """The ``score`` stage's pairs with each response token's score and 0/1 selection mask."""
        return self.stage_dir("score") / "scored.jsonl"

    def model_path(self, stage: str) -> str:
        """The folder of the model a training stage (``oracle``, ``guidance``, ``train``) ended with."""
        return str(self.stage_dir(stage) / "model")

    def pairs(self, split: str) -> list[TokenizedPair]:
        return [row_pair(row) for row in read_jsonl(self.pairs_path(split))]

    def prompts(self, split: str = "test") -> list:
        """The distinct prompts (strings or message lists) of ``split``."""
        return [row["prompt"] for row in read_jsonl(self.prompts_path(split))]

    def scored(self) -> list[dict]:
        """The rows of the scored pairs: pair fields plus ``{chosen,rejected}_scores`` and ``_mask``."""
        return read_jsonl(self.scored_path())

    def done_record(self, stage: str) -> dict | None:
        """A finished stage's DONE record (fingerprint, configuration, seconds, summary), or None."""
        return read_done(self.stage_dir(stage))
