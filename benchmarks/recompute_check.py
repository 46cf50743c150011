"""What activation checkpointing costs in time, and what keeping the attention outputs changes, on the body alone.

    python -m benchmarks.recompute_check [--device cuda] [--lora] [--body smollm2|tiny] [--rounds N]

A random Llama with SmolLM2-135M's body sizes (or a tiny one, to check the code), its layers as selpo's trainer runs
them (``selpo.lean_body``; ``selpo.recompute``), forward and backward of a batch of 16 rows of 256 tokens (the LoRA
step's 8 pairs of benchmarks/training_step.py), bf16 autocast on CUDA; the loss reads the last hidden states, not
the head. Four ways, timed in alternation after a warm-up, medians: activations stored; checkpointed; checkpointed
keeping the attention kernels' outputs (``train.keep_attention``: torch's selective activation checkpointing, whose
policy is asked about every operator of the forward and of its recomputation); checkpointed with the modules' own
forwards (no ``lean_body``: the body as transformers and PEFT run it, e.g. under TRL). With ``--lora`` a LoRA
adapter (rank 16 on the attention and MLP projections, ``selpo.lora``) is trained, as in the LoRA step. Prints a
Markdown table: the time per step and against the stored step, and on CUDA the peak memory the step adds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics

import torch

from .harness import timed_run

BODIES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
                 num_key_value_heads=2),
}
WAYS = ("stored", "checkpointed", "checkpointed, attention kept", "checkpointed, own forwards")


def build(way: str, body: str, lora_rank: int, device: str):
    """The random model (the same weights every time) set up as the trainer sets it up for ``way``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from selpo import lora
    from selpo.config import LoopConfig
    from selpo.lean_body import lean_body
    from selpo.recompute import enable_gradient_checkpointing

    config = LlamaConfig(vocab_size=256, **BODIES[body], attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    if lora_rank:
        lora.add_adapter(model, LoopConfig(lora_rank=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0), "train")
    model.train()
    checkpointed = way != "stored"
    if checkpointed:
        enable_gradient_checkpointing(model, keep_attention=way.endswith("kept"))
    return model, lean_body(model, mlp=not checkpointed) if way != WAYS[3] else contextlib.nullcontext()


def step(model, ids: torch.Tensor, device: str) -> None:
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    with autocast:
        hidden = model.model(input_ids=ids).last_hidden_state
    hidden.float().square().mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--body", choices=tuple(BODIES), default="smollm2")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    ids = torch.randint(0, 256, (args.rows, args.length), generator=torch.Generator().manual_seed(1)).to(args.device)
    built = {way: build(way, args.body, 16 if args.lora else 0, args.device) for way in WAYS}
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    peaks: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        for model, lean in built.values():
            stack.enter_context(lean)
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for way, (model, _) in built.items():
                model.zero_grad(set_to_none=True)
                seconds, peaks[way] = timed_run(functools.partial(step, model, ids, args.device), args.device)
                if round_:
                    times[way].append(seconds)
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{args.body} body{' + LoRA' if args.lora else ''}, {args.rows} x {args.length} tokens, {where}, "
          f"torch {torch.__version__}, medians of {args.rounds} rounds in alternation\n")
    print("| activations | step | × stored |" + (" peak added |" if cuda else ""))
    print("|---|---|---|" + ("---|" if cuda else ""))
    stored = statistics.median(times["stored"])
    for way in WAYS:
        median = statistics.median(times[way])
        print(f"| {way} | {1000 * median:.1f} ms | {median / stored:.2f}× |"
              + (f" {peaks[way] / 2**20:.0f} MiB |" if cuda else ""))


if __name__ == "__main__":
    main()
