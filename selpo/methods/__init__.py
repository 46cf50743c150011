"""Training methods: each is a small object with ``loss(model, batch) -> (loss, metrics)``.

The loop in ``selpo.trainer`` takes any of them, so a new method is a new file here, not a new loop.
"""

from .base import Method, MethodModule
from .dpo import DPO, with_reference_logps
from .guidance import RewardWeightedLikelihood, TokenRewardRanking, reward_weights
from .selective_dpo import SelectiveDPO, quantile_mask, selection_scores, selective_mask
from .sepo import SePO
from .simpo import SimPO

__all__ = ["DPO", "Method", "MethodModule", "RewardWeightedLikelihood", "SePO", "SelectiveDPO", "SimPO",
           "TokenRewardRanking", "quantile_mask", "reward_weights", "selection_scores", "selective_mask",
           "with_reference_logps"]
