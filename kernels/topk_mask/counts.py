"""How many tokens each segment selects: ``k = max(1, floor(ratio * n_valid))``, 0 for a segment without valid token.

Defined once here; ``topk_mask`` computes k with it once and passes k to every backend, so all of them select
the same number of tokens (a caller whose rule counts otherwise passes its own ``counts`` instead).

``ratio * n`` is rounded in floating point: ``ratio`` is only the float nearest to the fraction p/q the
caller meant (0.57 for 57/100, 1/3), and ``0.57 * 100`` evaluates to 56.99999999999999, whose floor
would lose a token. So the product is taken in float64 with a relative slack of 2**-50, which lifts
such a product back onto its integer and is far smaller than the gap of at least 1/q between p/q * n
and the next integer: whenever ``q * n < 8e14``, k is exactly ``floor(p * n / q)`` (for instance for
every ratio of up to five decimals at any N < 2**31, and for 1/3 or 2/7).
"""

from __future__ import annotations

import torch

SLACK = 1.0 + 2.0**-50


def select_counts(ratio: float, n_valid: torch.Tensor) -> torch.Tensor:
    """int64 [S]: k of each segment, given its number of valid tokens ``n_valid`` (int64 [S])."""
    k = torch.floor(n_valid.to(torch.float64) * (float(ratio) * SLACK)).long()
    return torch.where(n_valid > 0, k.clamp(min=1), 0)
