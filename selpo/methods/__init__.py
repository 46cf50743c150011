"""Training methods: each is a small object with ``loss(model, batch) -> (loss, metrics)``.

The loop in ``selpo.trainer`` takes any of them, so a new method is a new file here, not a new loop.
"""

from .base import Method, MethodModule
from .dpo import DPO, with_reference_logps
from .sepo import SePO

__all__ = ["DPO", "Method", "MethodModule", "SePO", "with_reference_logps"]
