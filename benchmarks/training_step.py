"""One training step on SmolLM2-135M (8 pairs per micro-batch), in time and peak memory, against what it would
otherwise be built on or run with, or laid out as. Three parts, and a check for a GPU:

sepo: selpo's fused path against the same SePO step built on full logits (30% of response tokens selected; 64 prompt
    + 192 response tokens per pair).
    fused:       last hidden states -> ``linear_selective_loss`` (log-probs of the selected tokens only);
    full-logits: ``model(...).logits`` [2P, T, V] -> log_softmax -> gather -> the same SePO loss.
    Both then run backward and an AdamW step, with the activations stored and with gradient checkpointing.

dpo: selpo's trainer (``selpo.trainer.train`` with ``selpo.methods.DPO``, padded layout) against TRL's
    ``DPOTrainer``, the trainer users would pick instead, each as its users run it: same model, same pairs (64 +
    192 tokens), one forward of all of them per optimizer step, gradient clipping at 1.0. Both compute the reference
    log-probs before training (TRL's ``precompute_ref_log_probs=True``), so neither holds a reference model during
    the step. With the activations stored and with gradient checkpointing (TRL's default), and on a GPU also TRL
    with ``use_liger_kernel=True``. Each trainer's optimizer step is timed between its own before- and after-step
    hooks (selpo's ``before_step``/``on_step``, a ``TrainerCallback``'s ``on_step_begin``/``on_step_end``),
    the first step (which creates the optimizer state) left out. TRL tokenizes text, so the pairs are made of
    words that are one token each and TRL's token ids are checked to be selpo's before anything is timed.

lora: the dpo part's two trainers training a LoRA adapter instead of every weight (``LORA``: the same adapter for
    both, through PEFT; selpo's ``lora_rank``, TRL's ``peft_config``), each computing the reference log-probs with
    the adapter disabled before training.

layouts: one DPO and one SePO step of selpo's trainer (activations stored, its default) with the body's batch in
    each token layout, padded, packed and shared (``selpo.data.packing``), on a dialogue set shaped like public
    multi-turn preference data (``benchmarks.dialogue_data``) and on the packaged sentiment data; on the dialogue
    set also TRL's DPOTrainer as its users run it (gradient checkpointing on, its default), asked for
    ``padding_free=True``. Beside each time: the tokens the body computed (``selpo.data.body_tokens``) and the
    attention's query-key products (``selpo.data.attention_entries``).

attention (``--part attention``, in one process): the shared layout's response log-probs and forward+backward
    through flash-attn's varlen kernel (when importable, on CUDA) and through SDPA block by block, against the
    padded layout through SDPA, in bf16 autocast (``attention_check``); rehearsed on CPU.

Each variant (in the layouts part, the layouts of one method and data set together) runs in fresh processes.
Peak: on CPU the resident set's high-water mark during the step (reset when it begins), and what the step adds to
the resident set it starts with (the model, its optimizer state and the batch), from a process in which every large
allocation is mmap'ed, so that the resident set follows the live tensors (see ``run_all``); on CUDA the same from
``torch.cuda.max_memory_allocated``. A run of some parts keeps the other parts' sections of an existing report.

    python -m benchmarks.training_step                            # CPU, float32, sepo, dpo, lora: RESULTS-step.md
    python -m benchmarks.training_step --part layouts --dialogue half --rounds 1   # CPU: its layouts section
    python -m benchmarks.training_step --device cuda              # the dpo and lora parts on a GPU, bf16 autocast
    python -m benchmarks.training_step --part attention --device cuda --out FILE   # the GPU check of the layouts
    python -m benchmarks.training_step --part dpo --tiny --out X  # toy size, to check the code (the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import torch

from selpo import segment_attention, trainer
from selpo.batches import Example, split_packed
from selpo.config import LoopConfig, RunConfig
from selpo.data import (
    LAYOUTS,
    TokenizedPair,
    attention_entries,
    body_tokens,
    collate_pairs,
    default_data_path,
    load_preference_dataset,
    tokenize_pairs,
)
from selpo.data.packing import PACKED, PADDED, SHARED
from selpo.kernels import linear_logprobs, linear_selective_loss, sepo_loss, topk_mask
from selpo.lean_body import lean_body
from selpo.logprobs import response_states
from selpo.methods import DPO, SePO, with_reference_logps
from selpo.models import load_causal_lm
from selpo.packing_check import choose_layout
from selpo.recompute import enable_gradient_checkpointing
from selpo.trainer import make_accelerator, train

from .dialogue_data import SHAPES, DialogueShape, describe, dialogues, one_token_words
from .harness import REPO, Step, _reset_high_water_mark, _status_kib, measure_peak, timed_run

RATIO = 0.3  # share of response tokens the SePO step selects
SEPO_VARIANTS = ("fused", "full-logits")
# The lora part's adapter: rank 16, alpha 32 on every attention and MLP projection (selpo's default targets), a
# common choice for DPO on a 7-8B model, without dropout (which would only add the same noise to both trainers).
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0, "targets": LoopConfig.lora_targets}
LORA_TARGET = 0.6  # the lora part's target: selpo's step time and peak as a share of TRL's
LAYOUT_SETS = ("dialogue", "sentiment")
LAYOUT_METHODS = ("dpo", "sepo")
# Targets of the layouts part: the shared step's time and peak as a share of the padded step's, per data set.
LAYOUT_TARGETS = {"dialogue": {"median_s": 0.5, "peak_bytes": 0.7}, "sentiment": {"median_s": 0.9, "peak_bytes": 0.9}}
# The attention check's tolerances (attention_check): on every response token's bf16 log-prob, its gap to the padded
# path's relative to max(1, |log-prob|); on the mean error to the float32 log-probs, a multiple of the padded bf16
# path's own plus an absolute slack.
ATTENTION_RTOL, ATTENTION_MEAN_FACTOR, ATTENTION_MEAN_ATOL = 2 ** -5, 1.5, 2 ** -10


@dataclass(frozen=True)
class Size:
    """The model and the batch: ``pairs`` pairs (of ``prompt_len`` prompt and ``response_len`` response tokens, the
    end-of-sequence token included, in the sepo and dpo parts; drawn in ``dialogue``'s shape in the layouts part);
    ``rounds`` timed steps (rounds of the layouts) per measuring process."""

    model: str = "default"
    pairs: int = 8
    prompt_len: int = 64
    response_len: int = 192
    rounds: int = 3
    dialogue: DialogueShape = DialogueShape()


# --wide: a random Llama with Llama 3.2 1B's body sizes (1.07B parameters with SmolLM2's 49,152-token vocabulary, tied
# head) for the attention check on a GPU. SmolLM2's step there took about 9x what its FLOPs need at the card's
# matmul rate (GPU-NOTES.md, the lease of 2026-12-04 16:26): something other than its GEMMs set its time (launches
# and small kernels, by the counts; the check's profile is to tell), and the shared layout's fewer tokens showed as
# memory only. A body this size should be set by its GEMMs (a prediction).
WIDE_BODY = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=4096)


def wide_model(folder: str) -> str:
    """The ``--wide`` model (``WIDE_BODY``, random, seeded) saved in ``folder``, with SmolLM2's tokenizer."""
    from selpo.models import load_tokenizer
    from selpo.testing import tiny_model_dir

    return tiny_model_dir(folder, tokenizer=load_tokenizer("default"), body=WIDE_BODY, name="wide-llama")


def model_name(size: Size) -> str:
    if size.model == "default":
        return "SmolLM2-135M-Instruct"
    if os.path.basename(size.model) == "wide-llama":
        return "a random Llama (" + ", ".join(f"{k} {v}" for k, v in WIDE_BODY.items()) + "; SmolLM2's tokenizer)"
    return size.model


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


# ---- dpo and layouts: selpo's trainer (and TRL's DPOTrainer) ----

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

    def summary(self, steps: list[dict]) -> dict:
        """Median time and largest peaks of ``steps``."""
        times = [s["seconds"] for s in steps]
        return {"median_s": statistics.median(times), "times_s": times,
                "peak_bytes": max(s["peak_bytes"] for s in steps),
                "peak_extra_bytes": max(s["extra_bytes"] for s in steps)}

    def after_first(self, rounds: int) -> dict:
        """``summary`` of the ``rounds`` steps after the first (which creates the optimizer state)."""
        if len(self.steps) < rounds + 1:
            raise RuntimeError(f"{len(self.steps)} steps were measured, {rounds + 1} were needed")
        return self.summary(self.steps[1:1 + rounds])


def words_pairs(tokenizer, size: Size, seed: int = 0) -> list[TokenizedPair]:
    """``size.pairs`` pairs of random one-token words of the sepo and dpo parts' lengths, each response ending with
    the EOS token (which TRL appends to a text response)."""
    words, rng = one_token_words(tokenizer), random.Random(seed)
    eos = [tokenizer.eos_token_id]
    return [TokenizedPair(rng.choices(words, k=size.prompt_len), rng.choices(words, k=size.response_len - 1) + eos,
                          rng.choices(words, k=size.response_len - 1) + eos, row=i) for i in range(size.pairs)]


def step_pairs(data: str, tokenizer, size: Size) -> list[TokenizedPair]:
    """The micro-batch of ``data``: "words" (``words_pairs``), "dialogue" (the first ``size.pairs`` dialogues of
    seed 0, of ``size.dialogue``'s shape) or "sentiment" (the first ``size.pairs`` rows of the packaged training
    data, tokenized as selpo's data stage does, under the dialogue shape's caps)."""
    if data == "words":
        return words_pairs(tokenizer, size)
    if data == "dialogue":
        return [d.pair for d in dialogues(tokenizer, size.pairs, shape=size.dialogue)]
    rows = load_preference_dataset(default_data_path("train")).select(range(size.pairs))
    return tokenize_pairs(rows, tokenizer, max_length=size.dialogue.max_length,
                          max_prompt_length=size.dialogue.max_prompt, strict=True)[0]


def measure_selpo_dpo(checkpointing: bool, size: Size, device: str, lora: bool = False) -> dict:
    """selpo's trainer on the words pairs, training every weight or (``lora``) the ``LORA`` adapter."""
    accelerator = make_accelerator(RunConfig(device=device))  # bf16 autocast on a GPU, float32 on CPU
    model, tokenizer = load_causal_lm(size.model, device=accelerator.device)
    backend = "triton" if accelerator.device.type == "cuda" else "torch"
    examples = [Example(p) for p in words_pairs(tokenizer, size)]
    examples = with_reference_logps(accelerator, model, examples, pad_id=tokenizer.pad_token_id,
                                    batch_size=size.pairs, backend=backend)
    # The last step also writes the final checkpoint: it runs untimed, after the measured ones.
    loop = LoopConfig(batch_size=size.pairs, micro_batch_size=size.pairs, lr=1e-6, max_steps=size.rounds + 2,
                      save_every=0, warmup_ratio=0.0, gradient_checkpointing=checkpointing,
                      **({"lora_rank": LORA["rank"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
                          "lora_targets": LORA["targets"]} if lora else {}))
    meter = StepMeter(accelerator.device.type)
    with tempfile.TemporaryDirectory() as out:
        trained = train(accelerator, model, tokenizer, DPO(beta=0.1, backend=backend), examples, loop, out, seed=0,
                        before_step=lambda step, lm: meter.begin(), on_step=lambda done: meter.end())
    return {**meter.after_first(size.rounds), "trained_params": trained_params(trained)}


def trained_params(model: torch.nn.Module) -> int:
    """How many parameters of ``model`` the optimizer trained (those requiring a gradient)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def selected_masks(pairs: list[TokenizedPair], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair, SePO's selected tokens: ``RATIO`` of each response, at random (which tokens does not change the
    step's cost)."""
    batch = collate_pairs(pairs, 0)
    scores = torch.randn(batch.targets.shape[0], generator=torch.Generator().manual_seed(seed))
    return split_packed(topk_mask(scores, batch.cu_seqlens, RATIO), batch.cu_seqlens)


@contextlib.contextmanager
def trainer_step(accelerator, model, objective, examples: list[Example], loop: LoopConfig, pad_id: int):
    """Yields ``step(layout)``: one optimizer step of selpo's trainer on all of ``examples`` with the body's batch
    in ``layout``. ``selpo.trainer.train`` lays out a whole training in the one layout chosen for its model; to time
    the layouts in alternation in one process, this sets up what ``train`` sets up for its steps (its lean body, its
    AdamW prepared by Accelerate, a constant learning rate) and calls its step function, without its loop, log and
    checkpoints."""
    model.train()
    with trainer.own_accelerator(accelerator) as own, lean_body(model, mlp=not loop.gradient_checkpointing):
        module, optimizer = trainer._prepare_with_optimizer(own, trainer.ObjectiveModule(model, objective), loop)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        every = list(range(len(examples)))
        yield lambda layout: trainer._optimizer_step(own, module, optimizer, scheduler, examples, every, loop, pad_id,
                                                     layout)


def measure_layouts(method: str, data: str, order: list[str], size: Size, device: str) -> dict[str, dict]:
    """Per layout of ``order``: selpo's trainer step (``trainer_step``), ``method`` ("dpo": DPO on reference
    log-probs computed before, in the shared layout; "sepo": SePO's loss on ``selected_masks``) on ``data``'s
    micro-batch, timed ``size.rounds`` times in alternation (``order``, then reversed, ...) after one untimed step
    that creates the optimizer state; with each step's peaks and the body's tokens and attention products."""
    accelerator = make_accelerator(RunConfig(device=device))  # bf16 autocast on a GPU, float32 on CPU
    model, tokenizer = load_causal_lm(size.model, device=accelerator.device)
    for layout in order + [SHARED]:  # each checked on the probe, as a stage checks its layout; shared stays chosen
        refused = choose_layout(model, layout)
        if refused:
            raise RuntimeError(refused)
    backend = "triton" if accelerator.device.type == "cuda" else "torch"
    pairs = step_pairs(data, tokenizer, size)
    if method == "dpo":
        examples = with_reference_logps(accelerator, model, [Example(p) for p in pairs],
                                        pad_id=tokenizer.pad_token_id, batch_size=size.pairs, backend=backend)
        objective = DPO(beta=0.1, backend=backend)
    else:
        examples = [Example(p, {"mask": m}) for p, m in zip(pairs, selected_masks(pairs))]
        objective = SePO(backend=backend)
    loop = LoopConfig(batch_size=size.pairs, micro_batch_size=size.pairs, lr=1e-6, warmup_ratio=0.0)
    meter, steps = StepMeter(accelerator.device.type), {layout: [] for layout in order}
    with trainer_step(accelerator, model, objective, examples, loop, tokenizer.pad_token_id) as step:
        step(SHARED)  # the cheapest layout
        for r in range(size.rounds):
            for layout in order if r % 2 == 0 else order[::-1]:
                meter.begin()
                step(layout)
                meter.end()
                steps[layout].append(meter.steps[-1])
    return {layout: {**meter.summary(steps[layout]), **token_counts(pairs, tokenizer.pad_token_id, layout)}
            for layout in order}


def token_counts(pairs: list[TokenizedPair], pad_id: int, layout: str) -> dict:
    """The body's work for ``pairs`` in ``layout``: tokens computed (and padded, for the same responses) and the
    attention's query-key products per head and layer."""
    batch = collate_pairs(pairs, pad_id, layout)
    computed, padded = body_tokens(batch)
    return {"body_tokens": computed, "padded_tokens": padded, "attention_entries": attention_entries(batch)}


class Recorded(logging.Handler):
    """The messages a logger and its children emit while attached."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Recorded:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def measure_trl_dpo(data: str, checkpointing: bool, size: Size, device: str, liger: bool,
                    padding_free: bool = False, lora: bool = False) -> dict:
    """TRL's DPOTrainer on ``data``'s micro-batch (as text, checked to tokenize to selpo's ids), training every
    weight or (``lora``) the ``LORA`` adapter, given as PEFT's ``LoraConfig``. With
    ``padding_free``, what TRL answered to ``padding_free=True`` (its warning, or the error it raised, after which
    it runs padded), whether it ran padding-free, and the body's tokens in the layout it ran."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["targets"].split(","), task_type="CAUSAL_LM")
    model, tokenizer = load_causal_lm(size.model, device=device)
    pairs = step_pairs(data, tokenizer, size)
    text = tokenizer.decode
    rows = Dataset.from_dict({"prompt": [text(p.prompt_ids) for p in pairs],
                              "chosen": [text(p.chosen_ids[:-1]) for p in pairs],
                              "rejected": [text(p.rejected_ids[:-1]) for p in pairs]})
    meter = StepMeter(device)

    class Hooks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end()

    def trainer_for(out: str, free: bool):
        config = DPOConfig(output_dir=out, per_device_train_batch_size=size.pairs, gradient_accumulation_steps=1,
                           max_steps=size.rounds + 1, learning_rate=1e-6, beta=0.1, max_grad_norm=1.0,
                           bf16=device == "cuda", use_cpu=device == "cpu", precompute_ref_log_probs=True,
                           precompute_ref_batch_size=size.pairs, gradient_checkpointing=checkpointing,
                           gradient_checkpointing_kwargs={"use_reentrant": False}, use_liger_kernel=liger,
                           padding_free=free, max_length=None, logging_strategy="no", save_strategy="no",
                           report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0)
        return DPOTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer,
                          peft_config=peft_config, callbacks=[Hooks()])

    answer = {}
    with tempfile.TemporaryDirectory() as out:
        if padding_free:
            try:
                with Recorded("trl") as recorded:
                    dpo = trainer_for(out, True)
                answer = {"padding_free_answer": " ".join(recorded.messages) or "accepted, no warning",
                          "padding_free_used": bool(dpo.padding_free)}
            except Exception as e:  # what TRL answers is the record; the step then runs padded
                answer = {"padding_free_answer": f"{type(e).__name__}: {e}", "padding_free_used": False}
                dpo = trainer_for(out, False)
        else:
            dpo = trainer_for(out, False)
        tokenized = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dpo.train_dataset]
        if tokenized != [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]:
            raise RuntimeError("TRL's tokenization of the pairs differs from the token ids selpo is given")
        dpo.train()
    if not padding_free:
        return {**meter.after_first(size.rounds), "trained_params": trained_params(dpo.model)}
    layout = PACKED if answer["padding_free_used"] else PADDED  # padding-free: each sequence its own segment
    return {**meter.after_first(size.rounds), **answer, **token_counts(pairs, tokenizer.pad_token_id, layout)}


DPO_VARIANTS = {"selpo": "selpo trainer, DPO", "trl": "TRL DPOTrainer", "trl-liger": "TRL DPOTrainer, Liger kernels"}


def measure(job: dict) -> dict:
    size = Size(**{**job["size"], "dialogue": DialogueShape(**job["size"]["dialogue"])})
    if job["part"] == "sepo":
        return measure_sepo(job["variant"], job["checkpointing"], size)
    if job["variant"].startswith("trl"):
        return measure_trl_dpo(job["data"], job["checkpointing"], size, job["device"],
                               liger=job["variant"] == "trl-liger", padding_free=job["part"] == "layouts",
                               lora=job["part"] == "lora")
    if job["part"] == "layouts":
        return {"layouts": measure_layouts(job["method"], job["data"], job["order"], size, job["device"])}
    return measure_selpo_dpo(job["checkpointing"], size, job["device"], lora=job["part"] == "lora")


def jobs(parts: list[str], device: str, size: Size, sets: tuple[str, ...] = LAYOUT_SETS,
         methods: tuple[str, ...] = LAYOUT_METHODS) -> list[dict]:
    """Every process job to run, in report order, each in its ``group`` of jobs timed in alternation (a job
    marked ``once`` in its first pass only, ``run_all``). A job of the layouts part's ``selpo`` variant measures all
    the layouts (``measure_layouts``)."""
    todo = []

    def add(part, data, method, variants, checkpointing, once=()):
        group = len({job["group"] for job in todo})
        todo.extend({"part": part, "data": data, "method": method, "variant": v, "group": group,
                     "checkpointing": checkpointing(v), "once": v in once, "device": device, "size": asdict(size)}
                    for v in variants)

    for part in parts:
        if part == "layouts":
            for data in sets:
                for method in methods:
                    trl = ("trl",) if (data, method) == ("dialogue", "dpo") else ()
                    # TRL as its users run it (checkpointing on, its default), the costliest job: timed once
                    add(part, data, method, ("selpo",) + trl, lambda v: v == "trl", once=trl)
            continue
        variants = SEPO_VARIANTS if part == "sepo" else ("selpo", "trl") + (("trl-liger",) if device == "cuda" else ())
        for checkpointing in (False, True):
            add(part, "words", part, variants, lambda v, c=checkpointing: c)
    return todo


def measure_in_subprocess(job: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.training_step", "--measure", json.dumps(job)],
                         cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{job['part']} {job['data']} {job['method']} {job['variant']} failed:\n"
                           f"{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def run_all(todo: list[dict]) -> list[dict]:
    """Each job in fresh processes, one result per variant (a layouts job gives one per layout). On CUDA one process
    gives both times and peaks. On CPU the times come from processes with the allocator as users run it, two per
    job, in the order A B, B A within each group (``jobs``; a layouts job runs the layouts in ``LAYOUTS`` order, then
    reversed; a job marked ``once`` runs in the first pass only: A B A), so that a drift of the machine's speed
    during the run (several percent from one quarter hour to the next on the 2-core host) does not bias the ratios;
    the median is over both processes' steps. The peaks come from another process whose large allocations are all
    mmap'ed (glibc's MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident set and its high-water mark is
    the step's own; timed that way, a step pays a page fault for every page of every large tensor it allocates
    (selpo's DPO step here: 23.6 s instead of 13.7 s)."""
    plain = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    plain.pop("TRITON_INTERPRET", None)
    ordered = [{**job, "order": list(LAYOUTS)} for job in todo]
    if todo and todo[0]["device"] == "cuda":  # a lease's minutes: a failed job is reported, the others kept
        results = []
        for job in ordered:
            try:
                results += variant_results(job, [measure_in_subprocess(job, plain)], None)
            except RuntimeError as e:
                print(e, file=sys.stderr)
                results.append({**job, "failed": str(e).splitlines()[-1]})
        return results
    mapped = dict(plain, MALLOC_MMAP_THRESHOLD_="65536")
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(ordered):
        groups.setdefault(job["group"], []).append(i)
    runs: dict[int, list[dict]] = {i: [] for i in range(len(todo))}
    for group in groups.values():
        for i in group:
            runs[i].append(measure_in_subprocess(ordered[i], plain))
        for i in group[::-1]:
            if not ordered[i]["once"]:
                runs[i].append(measure_in_subprocess({**ordered[i], "order": list(LAYOUTS[::-1])}, plain))
    results = []
    for i, job in enumerate(ordered):
        peaks = measure_in_subprocess({**job, "size": {**job["size"], "rounds": 1}}, mapped)
        results += variant_results(job, runs[i], peaks)
    return results


def variant_results(job: dict, runs: list[dict], peaks: dict | None) -> list[dict]:
    """One result per variant of ``job``, from its timing ``runs`` and its mapped run ``peaks`` (None: the runs'
    own)."""
    base = {k: v for k, v in job.items() if k != "order"}
    if "layouts" not in runs[0]:
        return [merged(base, runs, peaks)]
    return [merged({**base, "variant": layout}, [run["layouts"][layout] for run in runs],
                   peaks and peaks["layouts"][layout]) for layout in LAYOUTS]


def merged(job: dict, runs: list[dict], peaks: dict | None) -> dict:
    steps = [t for run in runs for t in run["times_s"]]
    return {**job, **runs[0], "median_s": statistics.median(steps), "times_s": steps,
            **{k: v for k, v in (peaks or {}).items() if k.endswith("bytes")}}


# ---- attention: the shared layout's attention paths, in one process (a check for a GPU) ----

# path: (layout, segment attention's kernel: selpo.segment_attention.KERNELS; the padded path runs the model's SDPA)
ATTENTION_PATHS = {"padded-sdpa": (PADDED, None), "shared-sdpa": (SHARED, "sdpa"), "shared-flex": (SHARED, "flex"),
                   "shared-flash": (SHARED, "flash")}


def attention_check(device: str, size: Size) -> list[dict]:
    """The dialogue micro-batch in bf16 autocast through each attention path: padded through SDPA, shared block by
    block through SDPA, and on CUDA shared through compiled flex_attention and (flash-attn importable) flash-attn's
    varlen kernel. A path passes when its response log-probs are within ``ATTENTION_RTOL`` of max(1,
    |log-prob|) of padded SDPA's on every token (eight bf16 roundings: the paths' kernels sum in different orders
    through every layer; on SmolLM2 on CPU the shared path's largest gap was 0.6 of it), and are on average about as
    close to the float32 padded ones as padded SDPA's are (``ATTENTION_MEAN_FACTOR`` times its mean error plus
    ``ATTENTION_MEAN_ATOL``): a path that loses context shifts many tokens a little, which the first bound misses
    where the model barely reads its context (a tiny random model). Then one forward+backward of their sum (the
    step's body and head, without the optimizer), timed ``2 * size.rounds`` times in alternation (A B C, C B A, ...)
    after a warm-up, with its peak allocation on CUDA. A path that raises is reported with its error."""
    model, tokenizer = load_causal_lm(size.model, device=device)
    model.set_attn_implementation("sdpa")  # the padded path through SDPA also where flash-attn is installed
    pairs = step_pairs("dialogue", tokenizer, size)
    batches = {layout: collate_pairs(pairs, tokenizer.pad_token_id, layout).to(device) for layout in (PADDED, SHARED)}
    backend = "triton" if device == "cuda" else "torch"
    runs_here = {None, "sdpa"} | ({"flex"} if device == "cuda" else set()) \
        | ({"flash"} if device == "cuda" and segment_attention._FLASH else set())
    paths = [p for p, (_, kernel) in ATTENTION_PATHS.items() if kernel in runs_here]

    def logps(path: str, bf16: bool = True) -> torch.Tensor:
        layout, kernel = ATTENTION_PATHS[path]
        batch = batches[layout]
        with segment_attention.attention_kernel(kernel), torch.autocast(device, torch.bfloat16, enabled=bf16):
            hidden, head = response_states(model, batch)
            return linear_logprobs(hidden, head.weight, batch.targets, backend=backend, **head.op_kwargs()).float()

    model.eval()
    results = []
    with torch.no_grad():
        exact, padded = logps("padded-sdpa", bf16=False), logps("padded-sdpa")
        mean_bound = ATTENTION_MEAN_FACTOR * float((padded - exact).abs().mean()) + ATTENTION_MEAN_ATOL
        for path in paths:
            result = {"path": path, **token_counts(pairs, tokenizer.pad_token_id, ATTENTION_PATHS[path][0])}
            try:
                values = logps(path)
            except Exception as e:  # the path's failure is the result, reported beside the others
                results.append({**result, "ok": False, "error": f"{type(e).__name__}: {e}"})
                continue
            gap, error = (values - padded).abs(), (values - exact).abs()
            ok = bool((gap <= ATTENTION_RTOL * exact.abs().clamp(min=1)).all()) and float(error.mean()) <= mean_bound
            results.append({**result, "max_gap": float(gap.max()), "ok": ok, "max_error": float(error.max()),
                            "mean_error": float(error.mean())})
    model.train()
    cuda = device == "cuda"

    def step(path: str) -> tuple[float, int]:
        model.zero_grad(set_to_none=True)
        return timed_run(lambda: logps(path).sum().backward(), device)

    timed = [r["path"] for r in results if "error" not in r]
    for path in timed:
        step(path)
    runs = {path: [] for path in timed}
    for r in range(2 * size.rounds):
        for path in timed if r % 2 == 0 else timed[::-1]:
            runs[path].append(step(path))
    for result in results:
        if result["path"] in runs:
            times = [t for t, _ in runs[result["path"]]]
            result.update(median_s=statistics.median(times), times_s=times,
                          peak_extra_bytes=max(peak for _, peak in runs[result["path"]]),
                          **profiled(step, result["path"], cuda))
    return results


def profiled(step, path: str, cuda: bool) -> dict:
    """One more step of ``path`` under torch's profiler: its wall time, and on CUDA the kernels it launched and the
    time they kept the GPU busy (their intervals merged), which say whether the step waits on the GPU's arithmetic or
    on the host's launches; and the operators by their own time (device on CUDA, host on CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        seconds, _ = step(path)
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=15, max_name_column_width=60)
    return {"profile": {"wall_s": seconds, "kernels": len(kernels), "busy_s": covered(kernels) / 1e6, "table": table}}


def covered(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``intervals`` ((start, end) pairs): time overlapping kernels share counts once."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total, end = total + stop - start, stop
        elif stop > end:
            total, end = total + stop - end, stop
    return total


def attention_report(results: list[dict], device: str, size: Size, command: str, path: str) -> None:
    padded = results[0]
    flash = "" if any(r["path"] == "shared-flash" for r in results) else (
        " flash-attn's path did not run: " + ("flash-attn is not importable here." if device == "cuda"
                                              else "it runs on CUDA only, as compiled flex does."))
    lines = [f"# The shared layout's attention paths against padded SDPA ({device}, bf16 autocast)", "",
             f"- {run_line(device, command)}", f"- model: {model_name(size)}",
             f"- batch: the first {size.pairs} dialogues of benchmarks/dialogue_data.py (seed 0, {size.dialogue}); "
             f"log-probs of every response token; step: forward + backward of their sum (no optimizer), median of "
             f"{2 * size.rounds} runs per path in alternation after a warm-up"
             + ("; peak: torch.cuda.max_memory_allocated above the step's start" if device == "cuda" else ""),
             f"- check: |log-prob - padded SDPA's| <= 2^-5 max(1, |float32 log-prob|) on every token, and mean "
             f"|log-prob - float32's| <= {ATTENTION_MEAN_FACTOR} × padded SDPA's + 2^-10;{flash}", "",
             "| path | max gap to padded sdpa | within | max / mean error to float32 | step | × padded-sdpa | "
             "peak added | body tokens | attention products |", "|" + "---|" * 9]
    for r in results:
        counts = f"{r['body_tokens']:,} | {r['attention_entries']:,}"
        if "error" in r:
            lines.append(f"| {r['path']} | **NO**: {r['error'][:300]} | | | | | | {counts} |")
            continue
        peak = f"{r['peak_extra_bytes'] / 2**20:.0f} MiB" if device == "cuda" else "n/a (CPU)"
        lines.append(f"| {r['path']} | {r['max_gap']:.4f} | {'yes' if r['ok'] else '**NO**'} | "
                     f"{r['max_error']:.4f} / {r['mean_error']:.5f} | {r['median_s'] * 1e3:.1f} ms | "
                     f"{r['median_s'] / padded['median_s']:.2f}× | {peak} | {counts} |")
    lines += ["", "## One more step of each path under torch's profiler", "",
              "GPU busy: the union of its kernels' intervals, against the step's wall time: far below it, the step "
              "waits on the host (launches, Python, synchronizations) rather than on the GPU's arithmetic." if
              device == "cuda" else "On CPU the operators by their own host time."]
    for r in results:
        if "profile" not in r:
            continue
        p = r["profile"]
        busy = (f", {p['kernels']:,} kernels, GPU busy {p['busy_s'] * 1e3:.1f} ms ({p['busy_s'] / p['wall_s']:.0%})"
                if device == "cuda" else "")
        lines += ["", f"### {r['path']}: {p['wall_s'] * 1e3:.1f} ms{busy}", "", "```", p["table"].rstrip(), "```"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---- the report ----

SECTIONS = {"sepo": "## SePO step: fused ops against full logits",
            "dpo": "## DPO step: selpo's trainer against TRL's DPOTrainer",
            "lora": "## LoRA DPO step: selpo's trainer against TRL's DPOTrainer, the same adapter",
            "layouts": "## Token layouts: padded against packed against shared"}


def run_line(device: str, command: str) -> str:
    import transformers

    try:
        import trl

        versions = f"transformers {transformers.__version__}, trl {trl.__version__}"
    except ImportError:
        versions = f"transformers {transformers.__version__}"
    where = (f"cpu, {torch.get_num_threads()} torch threads" if device == "cpu" else torch.cuda.get_device_name())
    return (f"run: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, `{command}`; {where}; "
            f"torch {torch.__version__}, {versions}")


def timing_line(device: str, size: Size, part: str) -> str:
    if device != "cpu":
        return (f"median of {size.rounds} step(s) per variant, each variant (layouts: all of a group's layouts) in a "
                "fresh process, bf16 autocast")
    peaks = ("peaks from another process with every large allocation mmap'ed, so that the resident set follows the "
             "live tensors")
    if part == "layouts":
        return (f"float32; median of {2 * size.rounds} steps per layout from two fresh processes per group, each "
                "stepping through the layouts in alternation (padded, packed, shared, then reversed; the second "
                f"process starts reversed), after one untimed step; TRL's median of {size.rounds} step(s) from one "
                "process run between those two (times with the allocator as users run it); " + peaks)
    return (f"float32; median of {2 * size.rounds} steps from two fresh processes per variant, run in the order A B, "
            "B A within each activations setting (times with the allocator as users run it); " + peaks)


def ratio_table(results: list[dict], baseline: str, label, columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown rows of ``results``, each measure followed by its ratio to the ``baseline`` variant's result in the
    same group (``jobs``). ``label(r)`` names a row; ``columns``: (header, result key, unit) with unit "s"
    (seconds), "MiB" (a byte count) or "#" (a count)."""
    headers = ["variant", "activations"] + [h for header, _, _ in columns for h in (header, f"× {baseline}")]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        base = next((b for b in results if b["variant"] == baseline and b["group"] == r["group"]), None)
        cells = [label(r), "recomputed (checkpointing)" if r["checkpointing"] else "stored"]
        for _, key, unit in columns:
            value = r[key]
            text = f"{value:.2f} s" if unit == "s" else f"{value / 2**20:.0f} MiB" if unit == "MiB" else f"{value:,}"
            cells += [text, "-" if base is None else f"{value / base[key]:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


PEAKS = [("peak during step", "peak_bytes", "MiB"), ("added by the step", "peak_extra_bytes", "MiB")]


def sepo_section(results: list[dict], device: str, size: Size) -> list[str]:
    return [f"- step: {size.pairs} pairs, {size.prompt_len} prompt + {size.response_len} response tokens each; "
            f"{timing_line(device, size, 'sepo')}", "",
            f"{int(RATIO * 100)}% of response tokens selected; forward + backward + AdamW, float32; peak: what the "
            "step adds to the resident set over the model, its optimizer state and the batch.", ""] + \
        ratio_table(results, "full-logits", lambda r: r["variant"],
                    [("median step time", "median_s", "s"), ("peak over model+optimizer", "peak_extra_bytes", "MiB")])


def dpo_section(results: list[dict], device: str, size: Size, adapter: bool = False) -> list[str]:
    memory = "allocated tensors (torch.cuda.max_memory_allocated)" if device == "cuda" else "resident set (VmHWM)"
    return [f"- step: {size.pairs} pairs, {size.prompt_len} prompt + {size.response_len} response tokens each; "
            f"{timing_line(device, size, 'dpo')}", "",
            "One optimizer step of each trainer (forward of all pairs, backward, clipping, AdamW, the trainer's own "
            "bookkeeping); reference log-probs precomputed by both; AdamW as each trainer makes it (TRL: "
            "transformers' default, PyTorch's fused AdamW; selpo: fused AdamW too), each model's body as its trainer "
            "runs it (selpo: `lean_body`, its SwiGLU MLPs and RMSNorms storing only their inputs; under "
            "checkpointing its RMSNorms only, every layer recomputed up to its last GEMM, `selpo.recompute`; TRL: "
            "transformers' full checkpointing), both in the padded layout. Peak: the "
            f"{memory} during the step, and what the step adds to what it starts with. × trl: against TRL's "
            "DPOTrainer with the same activations setting." + (lora_line() if adapter else ""), ""] + \
        ratio_table(results, "trl", lambda r: DPO_VARIANTS[r["variant"]],
                    [("median step time", "median_s", "s")] + PEAKS)


def lora_line() -> str:
    return (f" Both train the same LoRA adapter, through PEFT (rank {LORA['rank']}, alpha {LORA['alpha']:g}, dropout "
            f"{LORA['dropout']:g}, on {LORA['targets'].replace(',', ', ')}; the output head frozen) and compute the "
            "reference log-probs with the adapter disabled (the same base weights, no second model); selpo's "
            "adapted MLPs store their input, gate and up outputs and the rank-r products, and each adapted "
            "projection's base GEMM accumulates onto the adapter's part (`selpo.lean_lora`). "
            f"Target: selpo at most {LORA_TARGET}× TRL's time and peak.")


def lora_section(results: list[dict], device: str, size: Size) -> list[str]:
    trained = ", ".join(f"{DPO_VARIANTS[v]} {n:,}" for v, n in
                        {r["variant"]: r["trained_params"] for r in results}.items())
    return dpo_section(results, device, size, adapter=True) + ["", f"Parameters trained: {trained}."]


def batch_line(data: str, pairs: list[TokenizedPair]) -> str:
    prompts = sum(len(p.prompt_ids) for p in pairs)
    total = prompts + sum(len(r) for p in pairs for r in p.responses)
    longest = max(len(p.prompt_ids) + len(r) for p in pairs for r in p.responses)
    where = (f"the first {len(pairs)} dialogues (seed 0)" if data == "dialogue" else
             f"the first {len(pairs)} rows of selpo/default_data/train.jsonl, tokenized by `tokenize_pairs`")
    return (f"{data}: {where}; prompt share {prompts / total:.2f} of the tokens (prompt / (prompt + chosen + "
            f"rejected)), longest prompt + response {longest} tokens")


def layouts_section(results: list[dict], device: str, size: Size, stats: dict, batches: dict) -> list[str]:
    lines = [f"- step: {size.pairs} pairs per micro-batch; {timing_line(device, size, 'layouts')}", "",
             "One optimizer step of selpo's trainer with DPO (reference log-probs precomputed) and with SePO (30% of "
             "each response's tokens selected), activations stored (selpo's default), the body's batch laid out "
             "padded (2P right-padded rows, each prompt computed twice), packed (one row, each prompt + response its "
             "own segment) or shared (one row, each prompt once, followed by its two responses); on the dialogue "
             "set also TRL's DPOTrainer as its users run it (gradient checkpointing, its default; padded: see below). "
             "Body tokens: the tokens the body computed for the batch (`selpo.data.body_tokens`; padded: rows × "
             "width); attention products: query-key products per head and layer (`selpo.data.attention_entries`; "
             "padded: a dense width × width per row, as SDPA computes under a padding mask).", ""]
    if "dialogue" in batches:
        shape, lengths = size.dialogue, stats["response_tokens"]
        turns = ", ".join(f"{n} with {t}" for t, n in stats["turns"].items())
        lines += [f"The dialogues (benchmarks/dialogue_data.py, {shape}; statistics of the first {stats['pairs']}, "
                  f"seed 0): prompt share {stats['prompt_share']:.3f} of all tokens; turns per prompt: {turns}; "
                  f"prompt tokens {stats['prompt_tokens']['min']}..{stats['prompt_tokens']['max']} (median "
                  f"{stats['prompt_tokens']['median']:.0f}); response tokens {lengths['min']}..{lengths['max']} "
                  f"(median {lengths['median']:.0f}, {stats['responses_under_30']:.0%} under 30, "
                  f"{stats['responses_over_200']:.0%} over 200); longest prompt + response "
                  f"{stats['longest_sequence']}.", ""]
    lines += ["Micro-batches:", ""] + [f"- {batch_line(data, pairs)}" for data, pairs in batches.items()]
    free = [r for r in results if "padding_free_answer" in r]
    if free:
        import trl

        lines += ["", f"TRL {trl.__version__}, asked for `padding_free=True`, answered: "
                      f"\"{free[0]['padding_free_answer']}\"; it ran "
                      f"{'padding-free' if free[0]['padding_free_used'] else 'padded'}."]
    columns = [("median step time", "median_s", "s")] + PEAKS + [("body tokens", "body_tokens", "#"),
                                                                  ("attention products", "attention_entries", "#")]
    targets = []
    for group in dict.fromkeys(r["group"] for r in results):
        rows = [r for r in results if r["group"] == group]
        data, method = rows[0]["data"], rows[0]["method"]
        lines += ["", f"### {data}, {method.upper() if method == 'dpo' else 'SePO'}", ""] + \
            ratio_table(rows, PADDED, layout_label, columns)
        shared, padded = (next(r for r in rows if r["variant"] == v) for v in (SHARED, PADDED))
        for key, name in (("median_s", "time"), ("peak_bytes", "peak")):
            ratio, goal = shared[key] / padded[key], LAYOUT_TARGETS[data][key]
            targets.append(f"- {data}, {method}: shared step's {name} {ratio:.2f}× the padded step's (target ≤ "
                           f"{goal}×): {'met' if ratio <= goal else '**not met**'}")
    memory = "allocated tensors" if device == "cuda" else "resident set"
    return lines + ["", "### Targets", "", f"Peak: the {memory} during the step (model and AdamW state included; the "
                    "step's own addition is in the tables).", ""] + targets


def layout_label(result: dict) -> str:
    return "TRL DPOTrainer" if result["variant"] == "trl" else f"selpo, {result['variant']}"


def write_report(results: list[dict], device: str, size: Size, command: str, path: str, layouts: dict) -> None:
    """The report of ``results``' parts; the sections of other parts already in ``path`` are kept."""
    model = model_name(size)
    run = f"- {run_line(device, command)}"
    sections = {}
    for part, section in (("sepo", sepo_section), ("dpo", dpo_section), ("lora", lora_section),
                          ("layouts", layouts_section)):
        chosen = [r for r in results if r["part"] == part and "failed" not in r]
        failed = [f"- failed, left out: {r['variant']}{', checkpointing' if r['checkpointing'] else ''} "
                  f"({r['failed']})" for r in results if r["part"] == part and "failed" in r]
        if chosen or failed:
            extra = (layouts["stats"], layouts["batches"]) if part == "layouts" else ()
            sections[part] = [SECTIONS[part], "", run] + failed + (section(chosen, device, size, *extra) if chosen
                                                                   else [])
    kept = old_sections(path)
    lines = [f"# One training step on {model}: selpo against what it would be built on or run with, or laid out as, "
             f"instead ({device})", "", "Each section names the run it comes from; a run of some parts (`--part`) "
             "keeps the other sections of this file."]
    for part in SECTIONS:
        if part in sections or part in kept:
            lines += [""] + sections.get(part, kept.get(part))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def old_sections(path: str) -> dict[str, list[str]]:
    """The sections already in the report at ``path`` (none if there is no file), by part."""
    if not os.path.exists(path):
        return {}
    sections, current = {}, None
    for line in open(path).read().splitlines():
        if line.startswith("## "):
            current = next((part for part, heading in SECTIONS.items() if line == heading), None)
        if current:
            sections.setdefault(current, []).append(line)
    return {part: lines[:-1] if lines[-1] == "" else lines for part, lines in sections.items()}


def layouts_context(size: Size, sets: tuple[str, ...]) -> dict:
    """What the layouts section says of its data: the dialogue set's statistics and each micro-batch."""
    from selpo.models import load_tokenizer

    tokenizer = load_tokenizer(size.model)
    return {"stats": describe(dialogues(tokenizer, 800, shape=size.dialogue)),
            "batches": {data: step_pairs(data, tokenizer, size) for data in sets}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--part", help="comma-separated parts, sepo, dpo, lora and/or layouts (default: sepo, dpo and "
                                       "lora on CPU, dpo and lora on CUDA; the sepo part runs on CPU only), or "
                                       "attention alone")
    parser.add_argument("--data", default=",".join(LAYOUT_SETS), help="the layouts part's data sets")
    parser.add_argument("--methods", default=",".join(LAYOUT_METHODS), help="the layouts part's methods")
    parser.add_argument("--dialogue", choices=SHAPES, default="full", help="the dialogues' shape (half: the CPU's)")
    parser.add_argument("--rounds", type=int, help="timed steps per measuring process (default 3; --tiny: 1)")
    parser.add_argument("--tiny", action="store_true", help="toy model and batch, to check the code in seconds")
    parser.add_argument("--wide", action="store_true", help="the attention part on a random model with Llama 3.2 "
                                                             "1B's body sizes (WIDE_BODY) instead of SmolLM2")
    parser.add_argument("--out", help="report file (default benchmarks/RESULTS-step.md, -cuda.md on a GPU; "
                                      "RESULTS-attention-DEVICE.md for the attention part)")
    parser.add_argument("--measure", metavar="JOB", help="measure one job (JSON) in this process (used internally)")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    parts = (args.part or ("sepo,dpo,lora" if args.device == "cpu" else "dpo,lora")).split(",")
    sets, methods = tuple(args.data.split(",")), tuple(args.methods.split(","))
    if (parts != ["attention"] and set(parts) - {"sepo", "dpo", "lora", "layouts"}) or \
            (args.device == "cuda" and "sepo" in parts) or set(sets) - set(LAYOUT_SETS) or \
            set(methods) - set(LAYOUT_METHODS):
        parser.error(f"--part takes sepo, dpo, lora and/or layouts (sepo on CPU only) or attention alone, --data "
                     f"{LAYOUT_SETS}, --methods {LAYOUT_METHODS}; got {args.part!r}, {args.data!r}, {args.methods!r}")
    name = ("RESULTS-step.md" if args.device == "cpu" else "RESULTS-step-cuda.md") if parts != ["attention"] \
        else f"RESULTS-attention-{args.device}.md"
    out = args.out or os.path.join(REPO, "benchmarks", name)
    command = ("python -m benchmarks.training_step " + " ".join(sys.argv[1:])).strip()
    with tempfile.TemporaryDirectory() as folder:
        size = tiny_size(folder) if args.tiny else Size()
        if args.wide:
            if parts != ["attention"]:
                parser.error("--wide applies to --part attention")
            size = replace(size, model=wide_model(folder))
        size = replace(size, dialogue=SHAPES[args.dialogue], rounds=args.rounds or size.rounds)
        if parts == ["attention"]:
            results = attention_check(args.device, size)
            attention_report(results, args.device, size, command, out)
        else:
            layouts = layouts_context(size, sets) if "layouts" in parts else {}
            results = run_all(jobs(parts, args.device, size, sets, methods))
            write_report(results, args.device, size, command, out, layouts)
    print(open(out).read())
    if not all(r["ok"] if parts == ["attention"] else "failed" not in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
