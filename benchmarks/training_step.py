"""One SePO training step on SmolLM2-135M (8 pairs, 256 tokens per sequence, 30% of response tokens selected):
selpo's fused path against the same step built on full logits, in time and peak memory.

fused:       last hidden states -> ``linear_selective_loss`` (log-probs of the selected tokens only);
full-logits: ``model(...).logits`` [2P, T, V] -> log_softmax -> gather -> the same SePO loss.
Both then run backward and an AdamW step, with the model's activations stored and with gradient
checkpointing (the trainer's ``gradient_checkpointing`` option). Each variant runs in a fresh process (its
peak resident set is its own, as in the suite's memory probes); time is the median of the timed rounds.

    python -m benchmarks.training_step            # writes benchmarks/RESULTS-step.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

from selpo.data import TokenizedPair, collate_pairs
from selpo.kernels import linear_selective_loss, sepo_loss, topk_mask
from selpo.logprobs import response_states
from selpo.models import load_causal_lm, resolve_model_path

from .harness import REPO, Step, measure_peak

PAIRS, SEQ_LEN, PROMPT_LEN, RATIO, ROUNDS = 8, 256, 64, 0.3, 3
VARIANTS = ("fused", "full-logits")


def make_step(variant: str, checkpointing: bool) -> Step:
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(resolve_model_path("default"))
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = model.config.vocab_size
    ids = lambda n: torch.randint(0, vocab, (n,)).tolist()  # noqa: E731 (token content does not change the cost)
    pairs = [TokenizedPair(ids(PROMPT_LEN), ids(SEQ_LEN - PROMPT_LEN), ids(SEQ_LEN - PROMPT_LEN), row=i)
             for i in range(PAIRS)]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    largest = torch.arange(2 * PAIRS) < PAIRS  # chosen: highest scores, rejected: lowest
    mask = topk_mask(torch.randn(batch.targets.shape[0]), batch.cu_seqlens, RATIO, largest=largest)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def loss_fused():
        hidden, head = response_states(model, batch)
        return linear_selective_loss(hidden, head.weight, batch.targets, batch.cu_seqlens, mask=mask, loss="sepo",
                                     **head.op_kwargs())[0]

    def loss_full_logits():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits.flatten(0, 1)[batch.positions].float(), dim=-1)
        logp = logp.gather(1, batch.targets[:, None]).squeeze(1)
        return sepo_loss(logp, mask, batch.cu_seqlens)[0]

    loss_fn = loss_fused if variant == "fused" else loss_full_logits

    def timed():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    return Step(timed=timed, clear=lambda: optimizer.zero_grad(set_to_none=True))


def measure(variant: str, checkpointing: bool) -> dict:
    """In this process: peak memory of one step above what the model, optimizer state and batch hold, then time."""
    step = make_step(variant, checkpointing)
    step.run()  # creates the optimizer state, so the peak below is a steady-state step
    peak = measure_peak(step, "cpu")
    times = []
    for _ in range(ROUNDS):
        step.prepare()
        start = time.perf_counter()
        step.timed()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "checkpointing": checkpointing, "median_s": statistics.median(times), "times_s": times, "peak_extra_bytes": peak["extra"]}


def run_all() -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    results = []
    for checkpointing in (False, True):
        for variant in VARIANTS:
            args = ["--variant", variant] + (["--checkpointing"] if checkpointing else [])
            out = subprocess.run([sys.executable, "-m", "benchmarks.training_step", *args], cwd=REPO,
                                 env=env, capture_output=True, text=True, check=True)
            results.append(json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1]))
    return results


def write_report(results: list[dict], path: str) -> None:
    lines = [
        "# One SePO training step on SmolLM2-135M: fused ops vs full logits (cpu)",
        "",
        f"- device: cpu, {torch.get_num_threads()} torch threads; torch {torch.__version__}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "- command: python -m benchmarks.training_step",
        f"- step: {PAIRS} pairs, {SEQ_LEN} tokens per sequence ({PROMPT_LEN} prompt + {SEQ_LEN - PROMPT_LEN} response), "
        f"{int(RATIO * 100)}% of response tokens selected, forward + backward + AdamW, float32; median of {ROUNDS}",
        "- peak: the most one step adds to the resident set over the model, its optimizer state and the batch "
        "(each variant in a fresh process)",
        "",
        "| variant | activations | median step time | × full logits | peak over model+optimizer | × full logits |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        full = next(f for f in results if f["variant"] == "full-logits" and f["checkpointing"] == r["checkpointing"])
        lines.append(f"| {r['variant']} | {'recomputed (checkpointing)' if r['checkpointing'] else 'stored'} "
                     f"| {r['median_s']:.2f} s | {r['median_s'] / full['median_s']:.2f}× "
                     f"| {r['peak_extra_bytes'] / 2**20:.0f} MiB | {r['peak_extra_bytes'] / full['peak_extra_bytes']:.2f}× |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, help="measure one variant in this process (used internally)")
    parser.add_argument("--checkpointing", action="store_true", help="with --variant: gradient checkpointing on")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "RESULTS-step.md"))
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.checkpointing)))
    else:
        results = run_all()
        write_report(results, args.out)
        print(open(args.out).read())
