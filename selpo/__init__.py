"""selpo: fused Triton kernels and a thin trainer for token-level preference optimization."""

import sys
from pathlib import Path

__version__ = "0.1.0"


def _unshadow_kernels() -> None:
    """Takes the source tree's root off ``sys.path`` (``python -m ...`` from it puts it there).

    The ops live in the root's ``kernels/`` folder and are imported as ``selpo.kernels`` only; with the root on
    the path that folder would also be the top-level module ``kernels``, hiding the Hugging Face package of that
    name, which transformers (5.x) installs and imports as soon as a model module loads.
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "kernels" / "linear_logprobs" / "__init__.py").is_file():
        return  # an installed copy: selpo/kernels sits inside the package, nothing to hide
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]


_unshadow_kernels()

# The Python entry points (selpo.api): light to import, as `selpo --help` is; torch comes with the first run.
from .api import run, run_stage  # noqa: E402

__all__ = ["run", "run_stage"]
