"""``python -m selpo.sentiment --out selpo/default_data`` regenerates the shipped default dataset."""

from __future__ import annotations

import argparse
import json

from ..models import DEFAULT_MODEL
from .generate import generate_default_dataset


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m selpo.sentiment", description=(
        "Generate the controlled-sentiment preference dataset: review prompts, responses sampled from the model, "
        "the more positive one by VADER chosen. Deterministic for a seed on a given machine."))
    parser.add_argument("--out", required=True, help="folder for train.jsonl, test.jsonl and meta.json")
    parser.add_argument("--pairs", type=int, default=400, help="pairs in all (default 400)")
    parser.add_argument("--test", type=int, default=80, help="held-out pairs among them (default 80)")
    parser.add_argument("--seed", type=int, default=0, help="orders the prompts and seeds the sampling (default 0)")
    parser.add_argument("--samples", type=int, default=4, help="responses sampled per prompt (default 4)")
    parser.add_argument("--min-gap", type=float, default=0.1,
                        help="skip a prompt whose best and worst samples differ by less in VADER score (default 0.1)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="response length limit (default 48)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="sequences sampled at once (default 64); the samples depend on it")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"local model folder, or {DEFAULT_MODEL!r} (SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    meta = generate_default_dataset(args.out, args.pairs, args.seed, test_pairs=args.test, num_samples=args.samples,
                                    min_gap=args.min_gap, max_new_tokens=args.max_new_tokens,
                                    batch_size=args.batch_size, model=args.model, device=args.device,
                                    progress=not args.quiet)
    print(json.dumps(meta, indent=2))
    return meta


if __name__ == "__main__":
    main()
