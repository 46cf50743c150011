"""The training loop: one function, readable top to bottom, shared by every training stage and method.

Accelerate runs it on a CPU or one GPU by default, and on several GPUs or machines under
``accelerate launch`` (DDP or FSDP) unchanged. The global batch (``batch_size`` pairs per optimizer step)
does not depend on the number of processes: each step's pairs are the same, split into
``micro_batch_size`` pieces per process and accumulated, so a run on 1 or N processes follows the same
trajectory up to floating-point rounding.

Exact resume: the pairs of each step are a pure function of (seed, step) (``selpo.data.BatchSchedule``),
and a checkpoint holds the model, AdamW, the schedule and every RNG state; a run killed after any step
and resumed from its last checkpoint ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from torch import nn

from . import checkpoint, lora, progress, tracking
from .atomic import write_text_atomic
from .batches import Batch, Example, collate
from .body import layout_of
from .data import BatchSchedule
from .data.packing import PADDED
from .fsdp1 import ignoring_frozen
from .lean_body import lean_body
from .recompute import enable_gradient_checkpointing
from .segment_attention import segment_attention

if TYPE_CHECKING:
    from .config import LoopConfig, RunConfig


class Objective(Protocol):
    """What the loop trains with: the loss of one micro-batch and its detached metrics (each method's, in
    ``selpo.methods``, or any object with this ``loss``).

    ``loss(model, batch)`` returns ``(loss, metrics)``: a 0-dim loss, the mean over the batch's pairs,
    and metrics as detached 1-dim tensors (e.g. per pair: "accuracy", "margin", "chosen_reward",
    "rejected_reward"; per response: "selected", the tokens the loss read, from which the module adds
    "token_share"), which the loop averages over the global batch.
    """

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class ObjectiveModule(nn.Module):
    """The model and its objective as one module whose forward returns the loss.

    The loop wraps this module with Accelerate (DDP, FSDP), so the whole loss, including the output
    head used by the fused op, runs inside the wrapped forward, where those wrappers expect it.
    """

    def __init__(self, lm: nn.Module, objective: Objective):
        super().__init__()
        self.lm = lm
        self.objective = objective

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = self.objective.loss(self.lm, batch)
        if "selected" in metrics:  # the share of each response's tokens the loss reads
            lengths = batch.pairs.cu_seqlens.diff().float().clamp(min=1)
            metrics = {**metrics, "token_share": metrics["selected"].float() / lengths}
        return loss, metrics


def make_accelerator(config: RunConfig) -> Accelerator:
    """An Accelerator for ``config.device`` and ``config.precision`` (processes come from ``accelerate launch``),
    with the trackers of ``config.report_to`` (started per run folder: ``selpo.stages.pipeline.tracked``)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use device='auto' or 'cpu'")
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    bf16 = config.precision == "bf16" or (config.precision == "auto" and not cpu and torch.cuda.is_bf16_supported())
    trackers = tracking.tracker_names(config.report_to)
    logs = ProjectConfiguration(logging_dir=str(tracking.logging_dir(config.run_dir))) if trackers else None
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", log_with=trackers or None,
                       project_config=logs)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on vectors (norm scales, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _prepare_with_optimizer(accelerator: Accelerator, module: torch.nn.Module, config: LoopConfig):
    """(module, AdamW) prepared in the order the accelerator's sharding needs: FSDP1 replaces the parameters
    when it wraps the module, so the optimizer is built over the wrapped module's; FSDP2 re-points an optimizer
    at the shards itself and takes both in one call; everything else takes either."""
    def adamw(m):
        # Fused: one pass over the parameters per step (on 2 CPU cores 0.10 s instead of the foreach default's
        # 0.47 s at 135M parameters); not over FSDP's shards, which no test here can run it on.
        fused = accelerator.distributed_type != DistributedType.FSDP
        return torch.optim.AdamW(param_groups(m, config.weight_decay), lr=config.lr, fused=fused)

    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        with ignoring_frozen(accelerator.state.fsdp_plugin, module, accelerator.num_processes):  # selpo.fsdp1
            module = accelerator.prepare(module)
        return module, accelerator.prepare(adamw(module))
    return accelerator.prepare(module, adamw(module))


class Tally:
    """Sums of the loss and metrics of one optimizer step, reduced over processes into means."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], pairs: int) -> None:
        items = {"loss": (loss.detach().float() * pairs, pairs)}
        items.update({k: (v.detach().float().sum(), v.numel()) for k, v in metrics.items()})
        for key, (total, count) in items.items():
            self.sums[key] = self.sums.get(key, 0.0) + total
            self.counts[key] = self.counts.get(key, 0) + count

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        keys = sorted(self.sums)
        local = torch.tensor([float(self.sums[k]) for k in keys] + [float(self.counts[k]) for k in keys],
                             dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(local, reduction="sum").tolist()
        return {k: total[i] / total[len(keys) + i] for i, k in enumerate(keys)}


def _resume(accelerator: Accelerator, ckpt_dir: Path, fingerprint: str, total: int, module: nn.Module,
            optimizer: torch.optim.Optimizer, objects: dict) -> int:
    """Loads the latest checkpoint of this same training (same fingerprint and length) into ``module``, its
    optimizer and ``objects``; returns its step."""
    found = checkpoint.latest(ckpt_dir)
    if found is None:
        return 0
    folder, state = found
    if state.get("fingerprint") != fingerprint or state.get("total_steps") != total:
        accelerator.print(f"ignoring checkpoint {folder}: it belongs to a different configuration")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(ckpt_dir)
        accelerator.wait_for_everyone()
        return 0
    checkpoint.load(accelerator, folder, module, optimizer, objects)
    accelerator.print(f"resuming from {folder} (step {state['step']} of {total})")
    return state["step"]


def _open_log(path: Path, start: int):
    """metrics.jsonl with the records of steps after ``start`` removed (they are about to be redone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() and start else []
    kept = [line for line in lines if json.loads(line)["step"] <= start]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return open(path, "a")


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The records of ``out_dir/metrics.jsonl`` written by ``train``, in step order."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` on a fresh temporary folder beside ``out``, then puts it in ``out``'s place."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def save_model(accelerator: Accelerator, module: torch.nn.Module, tokenizer, out: Path, *,
               merged: Path | None = None) -> None:
    """``save_pretrained`` of the trained model (and tokenizer) into ``out``, atomically, from the full state
    (FSDP's shards gathered).

    A LoRA model (``selpo.lora``) is saved as its adapter folder, and with ``merged`` also as the full folder
    ``merged``, base and adapter folded together.
    """
    lm = accelerator.unwrap_model(module).lm
    state = accelerator.get_state_dict(module)  # gathers FSDP shards; every process must call it
    if accelerator.is_main_process:
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        if lora.has_adapter(lm):
            _write_folder(out, lambda tmp: lora.save_adapter(lm, state, tokenizer, tmp))
            if merged is not None:
                full = _without_tied_copy(lm, lora.merged_state_dict(lm, state))
                _write_folder(merged, lambda tmp: (lm.save_pretrained(tmp, state_dict=full),
                                                   tokenizer.save_pretrained(tmp)))
        else:
            state = _without_tied_copy(lm, state)
            _write_folder(out, lambda tmp: (lm.save_pretrained(tmp, state_dict=state),
                                            tokenizer.save_pretrained(tmp)))
    accelerator.wait_for_everyone()


def _without_tied_copy(lm, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` less the output embedding where the model ties it to the input embedding.

    ``save_pretrained`` leaves a tied output embedding out only when it shares storage with the input one; the
    full state FSDP gathers holds two copies, so the folder would otherwise hold it twice (seen on an H200 with
    transformers 5.17), unlike the same model saved without FSDP."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or head is None or embedding is None:
        return state
    names = {module: name for name, module in lm.named_modules(remove_duplicate=False)}
    if f"{names[embedding]}.weight" in state:
        state.pop(f"{names[head]}.weight", None)
    return state


def _optimizer_step(accelerator: Accelerator, module, optimizer, scheduler, examples: list[Example],
                    chosen: list[int], config: LoopConfig, pad_id: int, layout: str) -> dict:
    """One optimizer step on the global batch ``chosen``: this process's micro-batches, gradients
    accumulated (synchronised across processes on the last one only), clipped, applied.

    Returns the values to log: the learning rate used, the gradient norm, and the means of the loss and
    the objective's metrics over the global batch.
    """
    world, rank, mb = accelerator.num_processes, accelerator.process_index, config.micro_batch_size
    accum = config.batch_size // (mb * world)
    tally = Tally()
    for micro in range(accum):
        piece = chosen[(micro * world + rank) * mb:(micro * world + rank + 1) * mb]
        batch = collate([examples[i] for i in piece], pad_id, layout).to(accelerator.device)
        with contextlib.ExitStack() as stack:
            if micro < accum - 1:
                stack.enter_context(accelerator.no_sync(module))
            if layout != PADDED:  # a checkpointed layer replays its attention in the backward
                stack.enter_context(segment_attention(accelerator.unwrap_model(module).lm))
            loss, metrics = module(batch)
            accelerator.backward(loss / accum)
        tally.add(loss, metrics, len(piece))
    grad_norm = accelerator.clip_grad_norm_(module.parameters(), config.max_grad_norm) if config.max_grad_norm else None
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"lr": lr, **tally.means(accelerator), "grad_norm": None if grad_norm is None else float(grad_norm)}


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based): a linear warm-up over the first ``warmup``
    steps, (step + 1) / (warmup + 1), then a cosine decay from 1 towards 0 over the other steps.

    The warm-up counts from step 1, not 0: no step runs at learning rate 0, so even a one-step training
    (a small oracle subset, say) moves its model.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@contextlib.contextmanager
def own_accelerator(accelerator: Accelerator):
    """A training's own Accelerator for the block, on the process's state (devices, processes, precision and
    sharding are ``accelerator``'s): what it prepares, and so what its checkpoints save and restore, is this
    training's model and optimizer alone, and a training run inside another's ``before_step`` (guidance's
    retraining rounds) leaves the outer one's untouched. Its registrations are let go when the block ends."""
    own = Accelerator(cpu=accelerator.device.type == "cpu", mixed_precision=accelerator.mixed_precision)
    try:
        yield own
    finally:
        own.free_memory()


def train(accelerator: Accelerator, model: torch.nn.Module, tokenizer, objective: Objective,
          examples: list[Example], config: LoopConfig, out_dir: str | Path, *, seed: int, fingerprint: str = "",
          on_step: Callable[[int], None] | None = None,
          before_step: Callable[[int, torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """Trains ``model`` with ``objective`` on ``examples``; returns it trained, saved in ``out_dir/model``.

    ``out_dir`` receives ``checkpoints/``, ``metrics.jsonl`` (one JSON record per logged step) and
    ``model/``. A checkpoint there with the same ``fingerprint`` (a hash of everything that shapes the
    training) and the same number of steps is resumed. With ``config.lora_rank`` the model gets a LoRA adapter
    first (``selpo.lora.add_adapter``: in place, the same object), which alone is trained, checkpointed and saved
    (``model/`` is then an adapter folder, ``merged/`` with ``config.lora_merge``). The body's batches are laid
    out as chosen for ``model`` (``selpo.body.layout_of``). ``on_step(step)`` runs after every optimizer step
    and its checkpoint (e.g. to evaluate); ``before_step(step, model)`` before every one, the first after a
    resume included (e.g. to alternate with another model: it may change ``examples`` in place, and may
    itself call ``train`` on the same accelerator).
    """
    out_dir = Path(out_dir)
    per_micro_step = config.micro_batch_size * accelerator.num_processes
    if config.batch_size % per_micro_step:
        raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of micro_batch_size "
                         f"({config.micro_batch_size}) x processes ({accelerator.num_processes})")
    if len(examples) < config.batch_size:
        raise ValueError(f"{len(examples)} training pairs do not fill one batch of batch_size={config.batch_size}")
    schedule = BatchSchedule(len(examples), config.batch_size, seed=seed)
    steps_per_epoch = schedule.steps_per_epoch
    total = config.max_steps or config.epochs * steps_per_epoch
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layout = layout_of(model)

    set_seed(seed)
    if config.lora_rank:  # before the layers are checkpointed and made lean: they see the adapted projections
        lora.add_adapter(model, config, config.SECTION)
    elif lora.has_adapter(model):  # a full training of an adapter model trains base and adapter folded together
        lora.merge_adapter(model)
    model.train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, keep_attention=config.keep_attention)
    lean = lean_body(model, mlp=not config.gradient_checkpointing) if config.lean_body else contextlib.nullcontext()
    with own_accelerator(accelerator) as own, lean:
        module, optimizer = _prepare_with_optimizer(own, ObjectiveModule(model, objective), config)
        # Not prepared: Accelerate would step a prepared scheduler once per process; checkpointed by us.
        factor = functools.partial(warmup_cosine, warmup=math.ceil(config.warmup_ratio * total), total=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        start = _resume(own, out_dir / "checkpoints", fingerprint, total, module, optimizer,
                        {"scheduler": scheduler})
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(_open_log(out_dir / "metrics.jsonl", start)) if accelerator.is_main_process \
                else None
            bar = stack.enter_context(progress.bar(total, out_dir.name, initial=start, leave=True,
                                                   show=accelerator.is_main_process))
            began = time.perf_counter()
            for step in range(start, total):
                if before_step is not None:
                    before_step(step, own.unwrap_model(module).lm)
                record = _optimizer_step(own, module, optimizer, scheduler, examples,
                                         schedule.indices(step), config, pad_id, layout)
                done = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('accuracy', float('nan')):.2f}")
                if log is not None and (done % config.log_every == 0 or done == total):
                    record = {"step": done, "epoch": done / steps_per_epoch, **record,
                              "seconds": time.perf_counter() - began}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    tracking.log_step(accelerator, out_dir, record)
                if (config.save_every and done % config.save_every == 0) or done == total:
                    checkpoint.save(own, out_dir / "checkpoints", done,
                                    {"fingerprint": fingerprint, "total_steps": total}, {"scheduler": scheduler})
                if on_step is not None:
                    on_step(done)
        save_model(own, module, tokenizer, out_dir / "model",
                   merged=out_dir / "merged" if config.lora_merge else None)
        return own.unwrap_model(module).lm
