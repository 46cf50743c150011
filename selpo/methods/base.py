"""What a training method is, in one object (``Method``): everything the pipeline, the train and eval stages,
the report and ``selpo compare`` know of it. Nothing else in selpo branches on a method's name.

Its loss (an ``Objective`` of ``selpo.trainer``) reads the policy's last hidden states at the response
positions and its output head (``selpo.logprobs.response_states``) and hands them to a fused op, with the
head's weight and ``**head.op_kwargs()`` (its bias and logit transform, ``selpo.head``): no method ever builds
full logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping

import torch
from torch import nn

from ..context import pair_row
from ..stage import Stage

if TYPE_CHECKING:
    from ..batches import Example
    from ..config import RunConfig
    from ..context import Context
    from ..data import TokenizedPair
    from ..trainer import Objective

LOG_RATIO_LEGEND = ("the trained policy's log-ratio log p<sub>policy</sub> - log p<sub>initial</sub>; every token "
                    "is trained")


@dataclass
class Prepared:
    """What a method hands the training loop: its objective, its examples (the pairs with the per-token values
    the objective reads) and a hook run before every optimizer step (``selpo.trainer.train``'s ``before_step``)."""

    objective: Objective
    examples: list[Example]
    before_step: Callable[[int, nn.Module], None] | None = None


@dataclass
class TokenLogps:
    """Per-token log-probs of the pairs a token view shows, as (chosen, rejected) tensors per pair."""

    policy: list[tuple[torch.Tensor, torch.Tensor]]  # under the trained policy
    initial: list[tuple[torch.Tensor, torch.Tensor]]  # under the initial model
    oracle: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # when the method runs the oracle stage


def view_row(pair: TokenizedPair, scores: tuple[list[float], list[float]], masks: tuple[list[int], list[int]]) -> dict:
    """A token view's row: the pair, ``{chosen,rejected}_scores`` and 0/1 ``{chosen,rejected}_mask``."""
    return pair_row(pair, chosen_scores=scores[0], rejected_scores=scores[1], chosen_mask=masks[0],
                    rejected_mask=masks[1])


class Method:
    """A training method. A subclass sets the class attributes and ``prepare``, and overrides what differs
    from the defaults; an instance registered with ``selpo.methods.register`` (or named by an entry point of the
    group ``selpo.methods``) is runnable as ``method = NAME``.
    """

    name: ClassVar[str]  # the value of the run's `method` key
    title: ClassVar[str]  # its name in reports
    # Its options: a dataclass of documented fields (selpo.options) with SECTION = name, the configuration
    # section [<name>] (`selpo config --keys` lists it; the train stage's fingerprint covers it); None: none.
    options: ClassVar[type | None] = None
    # The stages it runs between `data` and `train`, in order; the same stage may serve several methods.
    stages: ClassVar[tuple[Stage, ...]] = ()
    strength: ClassVar[str]  # the configuration key `selpo compare` varies
    grid: ClassVar[tuple[float, ...]]  # that key's values there; the first one's run shows its tokens
    selects: ClassVar[bool] = False  # whether its loss reads a chosen subset of the response tokens
    legend: ClassVar[str] = LOG_RATIO_LEGEND  # HTML: what its token view's colours and outlines show
    # Configuration keys (section.field) a stage's result depends on under this method only: stage -> keys.
    stage_keys: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({})

    def check(self, config: RunConfig) -> None:
        """Raises ValueError, naming the key, when ``config`` cannot run this method; called by the config."""

    def prepare(self, ctx: Context, policy: nn.Module, tokenizer, key: str) -> Prepared:
        """The objective and examples (and hook) the ``train`` stage trains ``policy`` with. ``key`` identifies
        this training (the stage's fingerprint): what the method saves for a resumed training must carry it."""
        raise NotImplementedError(f"method {self.name!r} does not say how it trains")

    def train_summary(self, ctx: Context, steps: int) -> dict:
        """Values the ``train`` stage adds to its summary (its DONE.json) after ``steps`` steps."""
        return {}

    def token_view(self, ctx: Context, pairs: list[TokenizedPair], logps: TokenLogps) -> list[dict]:
        """One ``view_row`` per pair: the score or weight the method gives each response token and whether its
        loss reads it (``eval/tokens.jsonl``, the reports' heatmaps). By default the trained policy's log-ratio
        to the initial model, every token read."""
        return [view_row(p, ((pc - ic).tolist(), (pr - ir).tolist()), ([1] * len(pc), [1] * len(pr)))
                for p, (pc, pr), (ic, ir) in zip(pairs, logps.policy, logps.initial)]
