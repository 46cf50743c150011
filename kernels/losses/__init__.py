"""losses: the pairwise preference losses (SePO, DPO / Selective-DPO, SimPO) and the reward-weighted
likelihood of token-level guidance, over packed per-token log-probs; and token-level guidance's reward
side: sequence scores aggregated from token rewards (``sequence_scores``, ``mean_lengths``) and the
Plackett-Luce loss over ranked groups of them (``plackett_luce_loss``).

Every per-segment sum goes through ``segment_sum``; ``backend=`` picks the implementation of the sums. The
pairwise losses and weighted_nll are also registered (``spec``) as the losses ``linear_selective_loss`` can end in.
"""

from .dpo import dpo_loss
from .ranking import mean_lengths, plackett_luce_loss, sequence_scores
from .sepo import sepo_loss
from .simpo import simpo_loss
from .spec import FusedLoss, Linear, Option, register
from .weighted_likelihood import weighted_nll

__all__ = ["FusedLoss", "Linear", "Option", "dpo_loss", "mean_lengths", "plackett_luce_loss", "register", "sepo_loss",
           "sequence_scores", "simpo_loss", "weighted_nll"]
