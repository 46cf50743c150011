"""What a stage of the pipeline is (``Stage``), and the four every method runs: ``data`` first, then the stages the
method declares (``Method.stages``: SePO's ``oracle`` and ``score``, guidance's ``guidance``), then ``train``,
``eval`` and ``report``. The bookkeeping around them (fingerprints, DONE records, what runs) is
``selpo.stages.pipeline``'s.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline over the run folder, writing ``run_dir/<name>/``."""

    name: str
    # Stages whose outputs it reads (they must be done first); None: every stage its method runs before it.
    needs: tuple[str, ...] | None
    # Configuration keys its result depends on: run-wide keys, section.field keys or whole sections.
    keys: tuple[str, ...]
    # One line for --help and the logs.
    help: str
    # The module whose ``run(ctx) -> dict`` does the work (the dict: a JSON summary kept in its DONE.json),
    # imported only when the stage runs, so that `selpo --help` stays fast; "": selpo.stages.<name>.
    module: str = ""
    # Its own configuration section [<name>]: a dataclass of documented fields (``selpo.options``), or None.
    options: type | None = None
    # What the model it trains is called on the report's training curves ("": it trains none).
    trains: str = ""

    def run(self, ctx: Context) -> dict:
        return importlib.import_module(self.module or f"selpo.stages.{self.name}").run(ctx)


DATA = Stage("data", needs=(), keys=("model", "data"), help="validate and tokenize the training and held-out pairs")
TRAIN = Stage("train", needs=None, keys=("seed", "method", "train"), help="train the policy with the run's method",
              trains="policy")
EVAL = Stage("eval", needs=None, keys=("seed", "eval"),
             help="sample the initial model and the policy on held-out prompts and compare them")
REPORT = Stage("report", needs=None, keys=("report",),
               help="write report.html: configuration, results, training curves, token heatmap")
FIRST, LAST = (DATA,), (TRAIN, EVAL, REPORT)  # the stages every method runs, around its own
