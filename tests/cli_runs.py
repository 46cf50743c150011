"""Runs of the `selpo` command for the end-to-end tests: the tiny settings every stage takes, and a call
that captures the output."""

import contextlib
import io
from pathlib import Path

from tiny_data import write_pairs

from selpo import cli
from selpo.testing import tiny_model_dir

PROMPTS = 3


def tiny_settings(model, train, test, **more) -> list[str]:
    """``--set`` arguments that make every stage of every method take seconds on a tiny model."""
    pairs = {"model": model, "data.train": train, "data.test": test, "data.max_length": 48, "backend": "torch",
             "oracle.fraction": 0.5, "oracle.batch_size": 4, "oracle.micro_batch_size": 2, "oracle.max_steps": 3,
             "oracle.lr": 1e-3, "oracle.save_every": 2, "score.chosen_ratio": 0.3, "score.rejected_ratio": 0.5,
             "score.batch_size": 7, "train.batch_size": 4, "train.micro_batch_size": 4, "train.max_steps": 3,
             "train.lr": 1e-3, "eval.prompts": PROMPTS, "eval.max_new_tokens": 6, "eval.batch_size": 2,
             "eval.token_pairs": 5, "report.pairs": 3, "guidance.fraction": 0.5, "guidance.batch_size": 4,
             "guidance.micro_batch_size": 2, "guidance.max_steps": 3, "guidance.lr": 1e-3, "guidance.every": 2,
             "guidance.samples": 3, "guidance.prompts": 4, "guidance.max_new_tokens": 6, **more}
    return [arg for key, value in pairs.items() for arg in ("--set", f"{key}={value}")]


def tiny_run_settings(root: Path, train_pairs: int = 30, test_pairs: int = 8) -> list[str]:
    """``tiny_settings`` over a tiny model and fresh pair files written under ``root``."""
    return tiny_settings(tiny_model_dir(root), write_pairs(root / "train.jsonl", train_pairs),
                         write_pairs(root / "test.jsonl", test_pairs, seed=1))


def selpo(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``selpo ARGS``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def finished_run(run_dir: Path, settings: list[str], *more) -> Path:
    """``run_dir`` after a ``selpo run`` with ``settings`` and ``more`` arguments that must succeed."""
    code, _, err = selpo("run", "--run-dir", run_dir, *settings, *more)
    assert code == 0, err[-3000:]
    return run_dir
