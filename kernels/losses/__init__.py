"""losses: the pairwise preference losses (SePO, DPO / Selective-DPO, SimPO) and the reward-weighted
likelihood of token-level guidance, over packed per-token log-probs.

Each loss is written once on top of ``segment_sum``; ``backend=`` picks the implementation of the sums.
"""

from .dpo import dpo_loss
from .sepo import sepo_loss
from .simpo import simpo_loss
from .weighted_likelihood import weighted_nll

__all__ = ["dpo_loss", "sepo_loss", "simpo_loss", "weighted_nll"]
