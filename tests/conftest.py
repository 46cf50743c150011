"""Test setup: Triton kernels run in Triton's CPU interpreter, so every backend is tested on this machine.

TRITON_INTERPRET must be set before any @triton.jit function is defined, hence here, before selpo is
imported. Tests pass ``backend=`` explicitly; tests/test_compile.py checks real GPU compilation in a
subprocess without the interpreter.

``SELPO_TEST_DEVICE=cuda pytest tests/test_<op>.py`` runs the same tests on a GPU instead: tensors are
made there by default and Triton compiles the kernels rather than interpreting them (docs/testing.md).
"""

import os

DEVICE = os.environ.get("SELPO_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing is ever fetched from a model hub: every model the tests use is built here or shipped in a package.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if DEVICE != "cpu":
    torch.set_default_device(DEVICE)

# The backends each op is tested on, against the naive reference in float64.
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(a fresh folder, the ``--set`` arguments of a tiny run in it: cli_runs.tiny_run_settings), per test module."""
    from cli_runs import tiny_run_settings

    root = tmp_path_factory.mktemp("tiny_run")
    return root, tiny_run_settings(root)
