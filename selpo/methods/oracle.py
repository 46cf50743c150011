"""The ``oracle`` stage as SePO and Selective-DPO declare it (its code: ``selpo.stages.oracle``), with its section."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from ..options import LoopConfig, option, require
from ..stage import Stage
from .dpo import DPOOptions


@dataclass
class OracleConfig(LoopConfig):
    """SePO and Selective-DPO: DPO training of a copy of the initial model, the oracle (SePO) or strong
    reference (Selective-DPO)."""

    SECTION: typing.ClassVar[str] = "oracle"
    fraction: float = option(0.3, "Share of the training pairs (a seeded random subset) the oracle learns from.")
    beta: float = option(DPOOptions.beta, "DPO's KL strength beta.")

    def __post_init__(self):
        super().__post_init__()
        require(self.SECTION, "fraction", 0 < self.fraction <= 1, f"must lie in (0, 1], got {self.fraction}")
        require(self.SECTION, "beta", self.beta > 0, f"must be > 0, got {self.beta}")


ORACLE = Stage("oracle", needs=("data",), keys=("model", "seed", "oracle"), options=OracleConfig,
               trains="oracle (DPO)",
               help="DPO-train a copy of the initial model on a share of the training pairs (SePO's oracle, "
               "Selective-DPO's reference)")
