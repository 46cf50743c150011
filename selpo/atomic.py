"""Writing a file in one step: readers (and a crash) see the old file or the new one, never a mix."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` by ``text``: written to a temporary file, flushed to disk, then ``os.replace``d."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
