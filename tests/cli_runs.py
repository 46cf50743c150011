"""Runs of the `selpo` command for the end-to-end tests: the tiny settings every stage takes, and a call
that captures the output."""

import contextlib
import io

from selpo import cli

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


def selpo(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``selpo ARGS``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()
