"""Do two runs of the same training agree on their first steps? The losses each stage logged in its
``metrics.jsonl`` (``selpo.trainer.read_metrics``), step by step, within a tolerance.

benchmarks/gpu_train_check.sh runs the embedded default twice in bf16 autocast, once with the triton backend and
once with the torch backend, from the same data (and the same selected tokens for the policy), and checks here that
the fused ops give the trainer the same first steps on either backend. Under bf16 autocast every matmul rounds to
8 significant bits (unit roundoff 2^-8); the two backends round at different places (the head's GEMMs and their
accumulation), so their losses differ by a few such roundings of the loss. The tolerance is eight of them:
|loss_a - loss_b| <= 2^-5 * max(1, |loss_b|). An op that reads a wrong token or a wrong row is off by far more.
Later steps drift apart as the updates compound, so only the first steps are compared.

    python -m benchmarks.train_check RUN_A RUN_B [--stages oracle,train] [--steps 3] [--out check.md]

Exits with status 1 when a loss is outside the tolerance or a stage logged fewer steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selpo.trainer import read_metrics

RTOL = 2.0 ** -5


def compare(run_a: Path, run_b: Path, stages: list[str], steps: int) -> tuple[list[list[str]], bool]:
    """The table rows (stage, step, both losses, difference, tolerance, verdict) and whether all agree."""
    rows, ok = [], True
    for stage in stages:
        a, b = read_metrics(run_a / stage)[:steps], read_metrics(run_b / stage)[:steps]
        if len(a) < steps or len(b) < steps:
            rows.append([stage, "-", f"{len(a)} steps logged", f"{len(b)} steps logged", "-", "-", "**missing**"])
            ok = False
            continue
        for ra, rb in zip(a, b):
            diff, tol = abs(ra["loss"] - rb["loss"]), RTOL * max(1.0, abs(rb["loss"]))
            ok &= diff <= tol
            rows.append([stage, str(ra["step"]), f"{ra['loss']:.5f}", f"{rb['loss']:.5f}", f"{diff:.2e}",
                         f"{tol:.2e}", "ok" if diff <= tol else "**NO**"])
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--stages", default="oracle,train", help="comma-separated stage folders (training stages)")
    parser.add_argument("--steps", type=int, default=3, help="first steps compared")
    parser.add_argument("--out", type=Path, help="also write the table there (markdown)")
    args = parser.parse_args(argv)
    rows, ok = compare(args.run_a, args.run_b, args.stages.split(","), args.steps)
    lines = [f"Losses of the first {args.steps} steps: A = {args.run_a}, B = {args.run_b}; tolerance "
             f"|A - B| <= 2^-5 * max(1, |B|) (benchmarks/train_check.py says why).", "",
             "| stage | step | loss A | loss B | abs. difference | tolerance | agree |",
             "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "All agree." if ok else "**Some disagree or are missing.**"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
