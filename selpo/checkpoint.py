"""Training checkpoints written atomically, so a crash at any moment leaves a loadable one behind.

Layout under a checkpoint folder: ``step-XXXXXXXX/`` (Accelerate's ``save_state``: model (only its trained
parameters when some are frozen, e.g. a LoRA adapter without its base), optimizer, every process's RNG states;
``<name>.pt`` for other stateful objects such as the learning-rate schedule; ``trainer_state.json``) and
``latest.json``, which names the newest complete checkpoint. A checkpoint is written into a hidden temporary
folder, flushed to disk, renamed into place, and only then is ``latest.json`` replaced (``os.replace``,
atomic): until that instant the previous checkpoint stays the latest and untouched. Older checkpoints are
removed after that; one is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import torch
from accelerate import Accelerator

from .atomic import write_text_atomic

LATEST = "latest.json"
STATE = "trainer_state.json"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _frozen_names(model: torch.nn.Module) -> set[str] | None:
    """The state-dict keys of ``model`` a checkpoint leaves out: everything but its trained parameters when some of
    its parameters are frozen (a LoRA adapter's base, ``selpo.lora``: the same weights the resumed training
    loads again from the model folder), else None (a full training: the whole state)."""
    params = dict(model.named_parameters())
    trained = {name for name, p in params.items() if p.requires_grad}
    if len(trained) == len(params):
        return None
    return set(model.state_dict()) - trained


def _only_trained(models: list, weights: list, output_dir) -> None:
    """Accelerate's save-state hook: each model's state dict without its frozen entries (``_frozen_names``)."""
    for model, state in zip(models, weights):
        for name in _frozen_names(model) or ():
            state.pop(name, None)


def save(accelerator: Accelerator, root: str | Path, step: int, meta: dict, objects: dict) -> Path:
    """Saves the accelerator's state after ``step`` as the latest checkpoint under ``root``; removes older ones.

    ``objects`` maps names to objects with ``state_dict()`` (e.g. a scheduler) saved alongside; ``meta``
    (JSON values) is stored in ``trainer_state.json`` with the step. Every process must call it.
    """
    root = Path(root)
    name = f"step-{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    hook = accelerator.register_save_state_pre_hook(_only_trained)
    try:
        accelerator.save_state(str(tmp), safe_serialization=False)  # keeps tied weights tied, without a warning
    finally:
        hook.remove()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for key, obj in objects.items():
            torch.save(obj.state_dict(), tmp / f"{key}.pt")
        (tmp / STATE).write_text(json.dumps({"step": step, **meta}, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # left by a run that crashed before pointing latest.json at it
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, json.dumps({"checkpoint": name, "step": step}))
        for old in root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and how to restart."""

    def __init__(self, path: Path, why: str):
        stage = path.parent.parent if path.parent.name.startswith("step-") else path.parent
        super().__init__(f"checkpoint {path} cannot be read ({why}); to restart this training from its first step, "
                         f"run its stage with --fresh, or delete {stage}")


def latest(root: str | Path) -> tuple[Path, dict] | None:
    """(folder, trainer state) of the newest complete checkpoint under ``root``, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(root) / _read_json(pointer).get("checkpoint", "")
    return folder, _read_json(folder / STATE)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"{type(e).__name__}: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, "not a JSON object")
    return value


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Gives a fresh optimizer the state entries a step creates (AdamW's step, exp_avg, exp_avg_sq), unchanged
    parameters: one step at learning rate 0 on zero gradients (decay multiplies by exactly 1, the update is exactly
    0). Loading a checkpoint replaces them. Needed under FSDP1 with a sharded checkpoint: Accelerate loads only the
    entries the optimizer already has, so a fresh one silently kept none and resumed with AdamW's moments reset
    (seen on an H200, 2026-12-04: 2.4e-3 from the whole run after 2 steps at lr 1e-3). FSDP2's loader does this
    itself; a plain load replaces the state whole."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's wrapper
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    grads = [p.grad for p in params]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad


def load(accelerator: Accelerator, folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         objects: dict) -> None:
    """Restores ``model`` (the one the accelerator prepared), its ``optimizer``, the RNG states and ``objects`` saved
    by ``save``; a missing or damaged file is a ``CheckpointError`` naming it."""
    folder = Path(folder)
    init_optimizer_state(optimizer)
    try:
        # A checkpoint without the frozen weights (_frozen_names) loads into the model that holds them already.
        accelerator.load_state(str(folder), strict=_frozen_names(model) is None)
        for key, obj in objects.items():
            obj.load_state_dict(torch.load(folder / f"{key}.pt", weights_only=True))
    except Exception as e:
        missing = getattr(e, "filename", None)
        path = Path(missing) if missing else _damaged_file(folder) or folder
        raise CheckpointError(path, "missing" if missing else f"{type(e).__name__}: {str(e).splitlines()[0]}") from e


def _damaged_file(folder: Path) -> Path | None:
    """The first file of a checkpoint that is not a complete torch archive or safetensors file, if any."""
    for path in sorted(folder.iterdir()):
        if path.suffix in (".bin", ".pt", ".pkl") and not zipfile.is_zipfile(path):
            return path
        if path.suffix == ".safetensors" and not _complete_safetensors(path):
            return path
    return None


def _complete_safetensors(path: Path) -> bool:
    """Whether the file holds the header its first 8 bytes announce and the data the header describes."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        size = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            return False
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size >= 8 + size + end
