"""Packaging: the Triton code is importable only as selpo.kernels, never as a top-level `kernels` module
(the Hugging Face hub-kernels package has that name and transformers imports it when it is importable)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import selpo.kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_top_level_kernels_module(tmp_path):
    code = ("import importlib.util, selpo.kernels; spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else 'none')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()  # none, or the Hugging Face `kernels` package transformers (5.x) installs
    assert origin == "none" or Path(origin).parent != Path(REPO) / "kernels", f"`import kernels` finds {origin}"


def test_public_ops_exported():
    for name in ("linear_logprobs", "logprobs_from_logits", "token_scores", "topk_mask", "sepo_loss", "dpo_loss",
                 "simpo_loss", "weighted_nll", "linear_selective_loss", "sequence_scores", "mean_lengths",
                 "plackett_luce_loss"):
        assert callable(getattr(selpo.kernels, name)), name


def test_wheel_maps_kernels_under_selpo(tmp_path):
    """A regular (non-editable) install ships kernels/ as selpo/kernels/ and nothing named kernels at the top."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), REPO], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("selpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "selpo/kernels/streaming/passes_triton.py" in names and "selpo/kernels/ledger.py" in names
    assert "selpo/kernels/topk_mask/__init__.py" in names
    assert "selpo/default_data/train.jsonl" in names and "selpo/default_data/test.jsonl" in names
    assert not [n for n in names if n.startswith("kernels/")]


def test_the_repository_root_on_the_path_does_not_hide_the_kernels_package():
    """`python -m ...` from the repository root puts it on sys.path; importing selpo takes it off again, so the
    repository's kernels/ never shadows the Hugging Face `kernels` package that transformers imports."""
    code = ("import sys; sys.path.insert(0, ''); import selpo, importlib.util; "
            "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else 'none')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert origin == "none" or Path(origin).parent != Path(REPO) / "kernels", f"`import kernels` finds {origin}"
