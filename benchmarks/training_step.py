"""One training step on SmolLM2-135M (8 pairs, 64 prompt + 192 response tokens each), in time and peak memory,
against what it would otherwise be built on or run with. Two parts:

sepo: selpo's fused path against the same SePO step built on full logits (30% of response tokens selected).
    fused:       last hidden states -> ``linear_selective_loss`` (log-probs of the selected tokens only);
    full-logits: ``model(...).logits`` [2P, T, V] -> log_softmax -> gather -> the same SePO loss.
    Both then run backward and an AdamW step, with the activations stored and with gradient checkpointing.

dpo: selpo's trainer (``selpo.trainer.train`` with ``selpo.methods.DPO``) against TRL's ``DPOTrainer``, the
    trainer users would pick instead, each as its users run it: same model, same pairs, one forward of all of
    them per optimizer step, gradient clipping at 1.0. Both compute the reference log-probs before training
    (TRL's ``precompute_ref_log_probs=True``), so neither holds a reference model during the step. With the
    activations stored and with gradient checkpointing (TRL's default), and on a GPU also TRL with
    ``use_liger_kernel=True``. Each trainer's optimizer step is timed between its own before- and after-step
    hooks (selpo's ``before_step``/``on_step``, a ``TrainerCallback``'s ``on_step_begin``/``on_step_end``),
    the first step (which creates the optimizer state) left out. TRL tokenizes text, so the pairs are made of
    words that are one token each and TRL's token ids are checked to be selpo's before anything is timed.

Each variant runs in fresh processes, so its peak memory is its own. Peak: on CPU the resident set's high-water
mark during the step (reset when it begins), and what the step adds to the resident set it starts with (the
model, its optimizer state and the batch), from a second process in which every large allocation is mmap'ed (see
``run_all``); on CUDA the same from ``torch.cuda.max_memory_allocated``.

    python -m benchmarks.training_step                            # CPU, float32: RESULTS-step.md
    python -m benchmarks.training_step --device cuda              # the dpo part on a GPU, bf16 autocast
    python -m benchmarks.training_step --part dpo --tiny --out X  # toy size, to check the code (the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch

from selpo.config import LoopConfig, RunConfig
from selpo.data import TokenizedPair, collate_pairs
from selpo.examples import Example
from selpo.kernels import linear_selective_loss, sepo_loss, topk_mask
from selpo.logprobs import response_states
from selpo.methods import DPO, with_reference_logps
from selpo.models import load_causal_lm
from selpo.recompute import enable_gradient_checkpointing
from selpo.trainer import make_accelerator, train

from .harness import REPO, Step, _reset_high_water_mark, _status_kib, measure_peak

RATIO = 0.3  # share of response tokens the SePO step selects
SEPO_VARIANTS = ("fused", "full-logits")


@dataclass(frozen=True)
class Size:
    """The model and the batch: ``pairs`` pairs of ``prompt_len`` prompt and ``response_len`` response tokens
    (the end-of-sequence token included); ``rounds`` timed steps per measuring process."""

    model: str = "default"
    pairs: int = 8
    prompt_len: int = 64
    response_len: int = 192
    rounds: int = 3


def tiny_size(folder: str) -> Size:
    """The toy size of ``--tiny``: selpo's tiny random Llama (built into ``folder``), 2 pairs of 8 + 16 tokens."""
    from selpo.testing import tiny_model_dir

    return Size(model=tiny_model_dir(folder), pairs=2, prompt_len=8, response_len=16, rounds=1)


# ---- sepo: fused against full logits ----

def make_sepo_step(variant: str, checkpointing: bool, size: Size) -> Step:
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(size.model)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    vocab = model.config.vocab_size
    ids = lambda n: torch.randint(0, vocab, (n,)).tolist()  # noqa: E731 (token content does not change the cost)
    pairs = [TokenizedPair(ids(size.prompt_len), ids(size.response_len), ids(size.response_len), row=i)
             for i in range(size.pairs)]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    largest = torch.arange(2 * size.pairs) < size.pairs  # chosen: highest scores, rejected: lowest
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


def measure_sepo(variant: str, checkpointing: bool, size: Size) -> dict:
    """In this process: peak memory of one step above what the model, optimizer state and batch hold, then time."""
    step = make_sepo_step(variant, checkpointing, size)
    step.run()  # creates the optimizer state, so the peak below is a steady-state step
    peak = measure_peak(step, "cpu")
    times = []
    for _ in range(size.rounds):
        step.prepare()
        start = time.perf_counter()
        step.timed()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times, "peak_extra_bytes": peak["extra"]}


# ---- dpo: selpo's trainer against TRL's DPOTrainer ----

class StepMeter:
    """Wall time and peak memory of each optimizer step, between a trainer's before- and after-step hooks."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.steps: list[dict] = []

    def begin(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            if not _reset_high_water_mark():
                raise RuntimeError("this kernel cannot reset the resident set's high-water mark (clear_refs)")
            self.base = _status_kib("VmRSS") * 1024
        self.start = time.perf_counter()

    def end(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        peak = torch.cuda.max_memory_allocated() if self.cuda else _status_kib("VmHWM") * 1024
        self.steps.append({"seconds": seconds, "peak_bytes": peak, "extra_bytes": peak - self.base})

    def summary(self, rounds: int) -> dict:
        """Median time and largest peaks of the ``rounds`` steps after the first."""
        timed = self.steps[1:1 + rounds]
        if len(timed) < rounds:
            raise RuntimeError(f"{len(self.steps)} steps were measured, {rounds + 1} were needed")
        times = [s["seconds"] for s in timed]
        return {"median_s": statistics.median(times), "times_s": times,
                "peak_bytes": max(s["peak_bytes"] for s in timed),
                "peak_extra_bytes": max(s["extra_bytes"] for s in timed)}


def one_token_words(tokenizer) -> list[int]:
    """Ids of the tokens that are a space and a lowercase word, and that the tokenizer gives back alone for that
    text: a text joined from such words tokenizes to exactly their ids (byte-level BPE splits words at spaces)."""
    words = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if re.fullmatch(r" [a-z]{2,}", text) and tokenizer.encode(text, add_special_tokens=False) == [i]:
            words.append(i)
    if len(words) < 100:
        raise RuntimeError(f"the tokenizer has {len(words)} one-token words; the DPO pairs need at least 100")
    return words


def dpo_pairs(tokenizer, size: Size, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of random one-token words, each response ending with the EOS token
    (which TRL appends to a text response)."""
    words, rng = one_token_words(tokenizer), random.Random(seed)
    eos = [tokenizer.eos_token_id]
    return [(rng.choices(words, k=size.prompt_len), rng.choices(words, k=size.response_len - 1) + eos,
             rng.choices(words, k=size.response_len - 1) + eos) for _ in range(size.pairs)]


def measure_selpo_dpo(checkpointing: bool, size: Size, device: str) -> dict:
    accelerator = make_accelerator(RunConfig(device=device))  # bf16 autocast on a GPU, float32 on CPU
    model, tokenizer = load_causal_lm(size.model, device=accelerator.device)
    backend = "triton" if accelerator.device.type == "cuda" else "torch"
    examples = [Example(TokenizedPair(p, c, r, row=i)) for i, (p, c, r) in enumerate(dpo_pairs(tokenizer, size))]
    examples = with_reference_logps(accelerator, model, examples, pad_id=tokenizer.pad_token_id,
                                    batch_size=size.pairs, backend=backend)
    # The last step also writes the final checkpoint: it runs untimed, after the measured ones.
    loop = LoopConfig(batch_size=size.pairs, micro_batch_size=size.pairs, lr=1e-6, max_steps=size.rounds + 2,
                      save_every=0, warmup_ratio=0.0, gradient_checkpointing=checkpointing)
    meter = StepMeter(accelerator.device.type)
    with tempfile.TemporaryDirectory() as out:
        train(accelerator, model, tokenizer, DPO(beta=0.1, backend=backend), examples, loop, out, seed=0,
              before_step=lambda step, lm: meter.begin(), on_step=lambda done: meter.end())
    return meter.summary(size.rounds)


def measure_trl_dpo(checkpointing: bool, size: Size, device: str, liger: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load_causal_lm(size.model, device=device)
    pairs = dpo_pairs(tokenizer, size)
    text = tokenizer.decode
    data = Dataset.from_dict({"prompt": [text(p) for p, _, _ in pairs], "chosen": [text(c[:-1]) for _, c, _ in pairs],
                              "rejected": [text(r[:-1]) for _, _, r in pairs]})
    meter = StepMeter(device)

    class Hooks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end()

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=size.pairs, gradient_accumulation_steps=1,
                           max_steps=size.rounds + 1, learning_rate=1e-6, beta=0.1, max_grad_norm=1.0,
                           bf16=device == "cuda", use_cpu=device == "cpu", precompute_ref_log_probs=True,
                           precompute_ref_batch_size=size.pairs, gradient_checkpointing=checkpointing,
                           gradient_checkpointing_kwargs={"use_reentrant": False}, use_liger_kernel=liger,
                           max_length=None, logging_strategy="no", save_strategy="no", report_to="none",
                           disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Hooks()])
        tokenized = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
        if tokenized != [tuple(p) for p in pairs]:
            raise RuntimeError("TRL's tokenization of the pairs differs from the token ids selpo is given")
        trainer.train()
    return meter.summary(size.rounds)


DPO_VARIANTS = {"selpo": "selpo trainer, DPO", "trl": "TRL DPOTrainer", "trl-liger": "TRL DPOTrainer, Liger kernels"}


def measure(job: dict) -> dict:
    size = Size(**job["size"])
    if job["part"] == "sepo":
        return measure_sepo(job["variant"], job["checkpointing"], size)
    if job["variant"] == "selpo":
        return measure_selpo_dpo(job["checkpointing"], size, job["device"])
    return measure_trl_dpo(job["checkpointing"], size, job["device"], liger=job["variant"] == "trl-liger")


def jobs(parts: list[str], device: str, size: Size) -> list[dict]:
    """Every (part, variant, checkpointing) to measure, in report order."""
    todo = []
    for part in parts:
        variants = SEPO_VARIANTS if part == "sepo" else ("selpo", "trl") + (("trl-liger",) if device == "cuda" else ())
        for checkpointing in (False, True):
            todo += [{"part": part, "variant": v, "checkpointing": checkpointing, "device": device,
                      "size": asdict(size)} for v in variants]
    return todo


def measure_in_subprocess(job: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.training_step", "--measure", json.dumps(job)],
                         cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{job['part']} {job['variant']} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def run_all(todo: list[dict]) -> list[dict]:
    """Each job in fresh processes. On CUDA one process gives both times and peaks. On CPU the times come
    from processes with the allocator as users run it, two per job, in the order A B, B A within each (part,
    activations) group, so that a drift of the machine's speed during the run (several percent from one
    quarter hour to the next on the 2-core host) does not bias the ratios; the median is over both processes'
    steps. The peaks come from another process whose large allocations are all mmap'ed (glibc's
    MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident set and its high-water mark is the step's
    own; timed that way, a step pays a page fault for every page of every large tensor it allocates (selpo's
    DPO step here: 23.6 s instead of 13.7 s)."""
    plain = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    plain.pop("TRITON_INTERPRET", None)
    if todo and todo[0]["device"] == "cuda":
        return [{**job, **measure_in_subprocess(job, plain)} for job in todo]
    mapped = dict(plain, MALLOC_MMAP_THRESHOLD_="65536")
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(todo):
        groups.setdefault((job["part"], job["checkpointing"]), []).append(i)
    steps: dict[int, list[float]] = {i: [] for i in range(len(todo))}
    for group in groups.values():
        for i in group + group[::-1]:
            steps[i] += measure_in_subprocess(todo[i], plain)["times_s"]
    results = []
    for i, job in enumerate(todo):
        peaks = measure_in_subprocess({**job, "size": {**job["size"], "rounds": 1}}, mapped)
        results.append({**job, "median_s": statistics.median(steps[i]), "times_s": steps[i],
                        **{k: v for k, v in peaks.items() if k.endswith("bytes")}})
    return results


def ratio_table(results: list[dict], baseline: str, label, columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown rows of ``results``, each measure followed by its ratio to the ``baseline`` variant's result with
    the same activations setting. ``label(r)`` names a row; ``columns``: (header, result key, unit) with unit
    "s" (seconds) or "MiB" (a byte count)."""
    headers = ["variant", "activations"] + [h for header, _, _ in columns for h in (header, f"× {baseline}")]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        base = next(b for b in results if b["variant"] == baseline and b["checkpointing"] == r["checkpointing"])
        cells = [label(r), "recomputed (checkpointing)" if r["checkpointing"] else "stored"]
        for _, key, unit in columns:
            cells += [f"{r[key]:.2f} s" if unit == "s" else f"{r[key] / 2**20:.0f} MiB", f"{r[key] / base[key]:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sepo_table(results: list[dict]) -> list[str]:
    return ["## SePO step: fused ops against full logits", "",
            f"{int(RATIO * 100)}% of response tokens selected; forward + backward + AdamW, float32; peak: what the "
            "step adds to the resident set over the model, its optimizer state and the batch.", ""] + \
        ratio_table(results, "full-logits", lambda r: r["variant"],
                    [("median step time", "median_s", "s"), ("peak over model+optimizer", "peak_extra_bytes", "MiB")])


def dpo_table(results: list[dict], device: str) -> list[str]:
    memory = "allocated tensors (torch.cuda.max_memory_allocated)" if device == "cuda" else "resident set (VmHWM)"
    return ["## DPO step: selpo's trainer against TRL's DPOTrainer", "",
            "One optimizer step of each trainer (forward of all pairs, backward, clipping, AdamW, the trainer's own "
            "bookkeeping); reference log-probs precomputed by both; AdamW as each trainer makes it (TRL: "
            "transformers' default, PyTorch's fused AdamW; selpo: fused AdamW too), each model's body as its trainer "
            "runs it (selpo: `lean_body`, its SwiGLU MLPs and RMSNorms storing only their inputs; under "
            "checkpointing its RMSNorms only, and the attention kernels' outputs kept from the forward, "
            "`selpo.recompute`; TRL: transformers' full checkpointing). Peak: the "
            f"{memory} during the step, and what the step adds to what it starts with. × trl: against TRL's "
            "DPOTrainer with the same activations setting.", ""] + \
        ratio_table(results, "trl", lambda r: DPO_VARIANTS[r["variant"]],
                    [("median step time", "median_s", "s"), ("peak during step", "peak_bytes", "MiB"),
                     ("added by the step", "peak_extra_bytes", "MiB")])


def write_report(results: list[dict], device: str, size: Size, command: str, path: str) -> None:
    import transformers

    try:
        import trl

        versions = f"transformers {transformers.__version__}, trl {trl.__version__}"
    except ImportError:
        versions = f"transformers {transformers.__version__}"
    where = (f"cpu, {torch.get_num_threads()} torch threads, float32" if device == "cpu"
             else f"{torch.cuda.get_device_name()}, bf16 autocast")
    model = "SmolLM2-135M-Instruct" if size.model == "default" else size.model
    lines = [f"# One training step on {model}: selpo against what it would be built on or run with instead ({device})",
             "",
             f"- device: {where}; torch {torch.__version__}, {versions}",
             f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- command: {command}",
             f"- step: {size.pairs} pairs, {size.prompt_len} prompt + {size.response_len} response tokens each; "
             + (f"median of {2 * size.rounds} steps from two fresh processes per variant, run in the order A B, "
                "B A within each activations setting (times with the allocator as users run it); peaks from a "
                "third process with every large allocation mmap'ed, so that the resident set follows the live "
                "tensors" if device == "cpu" else f"median of {size.rounds} step(s), each variant in a fresh process")]
    for part, table in (("sepo", sepo_table), ("dpo", lambda rs: dpo_table(rs, device))):
        chosen = [r for r in results if r["part"] == part]
        if chosen:
            lines += [""] + table(chosen)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--part", help="comma-separated parts, sepo and/or dpo (default: both on CPU, dpo on CUDA; "
                                       "the sepo part runs on CPU only)")
    parser.add_argument("--tiny", action="store_true", help="toy model and batch, to check the code in seconds")
    parser.add_argument("--out", help="report file (default benchmarks/RESULTS-step.md, -cuda.md on a GPU)")
    parser.add_argument("--measure", metavar="JOB", help="measure one job (JSON) in this process (used internally)")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    parts = (args.part or ("sepo,dpo" if args.device == "cpu" else "dpo")).split(",")
    if set(parts) - {"sepo", "dpo"} or (args.device == "cuda" and "sepo" in parts):
        parser.error(f"--part takes sepo and/or dpo (sepo on CPU only), got {args.part!r}")
    name = "RESULTS-step.md" if args.device == "cpu" else "RESULTS-step-cuda.md"
    out = args.out or os.path.join(REPO, "benchmarks", name)
    command = "python -m benchmarks.training_step " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as folder:
        size = tiny_size(folder) if args.tiny else Size()
        results = run_all(jobs(parts, args.device, size))
        write_report(results, args.device, size, command.strip(), out)
    print(open(out).read())


if __name__ == "__main__":
    main()
