"""Progress bars for the work that can run for minutes: training steps, sampling, scoring, log-prob passes.

One policy for all of them: on stderr, from the main process only, and off when stderr is not a terminal
(logs and captured output stay clean) or when ``QUIET`` is set (``selpo ... --quiet``).
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

QUIET = False


def bar(total: int, desc: str, *, show: bool = True, initial: int = 0, leave: bool = False) -> tqdm:
    """A bar of ``total`` units, drawn where ``show`` (pass whether this is the main process) and the policy allow."""
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, leave=leave,
                disable=True if QUIET or not show else None)
