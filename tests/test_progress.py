"""Progress bars (selpo.progress): drawn on stderr when it is a terminal, never with --quiet, for every piece of
work ``map_batches`` runs under a name (sampling, scoring, log-prob passes)."""

import io
import sys

import pytest

from selpo import progress
from selpo.config import RunConfig
from selpo.distributed import map_batches
from selpo.trainer import make_accelerator


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stderr, quiet, drawn", [(Terminal, False, True), (Terminal, True, False),
                                                  (io.StringIO, False, False)])
def test_named_work_draws_a_bar_on_a_terminal_unless_quiet(stderr, quiet, drawn, monkeypatch):
    err = stderr()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress, "QUIET", quiet)
    accelerator = make_accelerator(RunConfig(device="cpu"))
    assert map_batches(accelerator, list(range(5)), 2, lambda chunk: [x * x for x in chunk], desc="squaring") \
        == [0, 1, 4, 9, 16]
    assert ("squaring" in err.getvalue()) == drawn
    written = err.getvalue()
    map_batches(accelerator, list(range(5)), 2, lambda chunk: chunk)  # unnamed work: no bar
    assert err.getvalue() == written
