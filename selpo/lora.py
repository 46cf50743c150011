"""LoRA adapters (through PEFT) on the models selpo trains: the base weights frozen, low-rank updates trained.

PEFT injects its LoRA layers into the transformers model itself, so every other part of selpo keeps calling that
same object (``selpo.head`` reads its head, ``selpo.body`` its body, ``selpo.lean_body`` and ``selpo.recompute``
its layers). The ``PeftModel`` that wraps it is kept beside it, in the model's ``__dict__`` (not a submodule, so
it is in no state dict and no module walk), only for what PEFT's own code does best: disabling the adapter
(``adapter_disabled``), saving it in the folder format ``PeftModel.from_pretrained`` reads (``save_adapter``) and
loading such a folder back onto its base (``load_adapter``). A causal LM's output head (tied input embeddings
too) stays frozen: the fused ops then skip its weight gradient. Guidance's reward model keeps its scalar head
(``score``) fully trained, as one of PEFT's ``modules_to_save``.

The frozen base is the reference: the reference log-probs, the score stage's reference and eval's initial model
come from the same weights with the adapter disabled, never from a second copy of the model.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import LoopConfig

PEFT = "_selpo_peft"  # the model's __dict__ entry holding the PeftModel around it
CONFIG_FILE = "adapter_config.json"  # what makes a folder an adapter folder (PEFT's name)
REWARD_HEAD = "score"  # guidance's reward head (selpo.reward_model), trained in full


def has_adapter(model: nn.Module) -> bool:
    """Whether PEFT injected a LoRA adapter into ``model`` (``add_adapter`` or ``load_adapter``)."""
    return PEFT in model.__dict__


def _peft(model: nn.Module):
    if not has_adapter(model):
        raise ValueError(f"model: {type(model).__name__} carries no LoRA adapter")
    return model.__dict__[PEFT]


def _targets(config: LoopConfig) -> list[str]:
    return [name.strip() for name in config.lora_targets.split(",")]


def _task(model: nn.Module) -> tuple[str, list[str] | None]:
    """PEFT's task type for ``model`` and the modules it trains in full: a causal LM (head frozen), or guidance's
    token reward model (its ``score`` head trained)."""
    if isinstance(model.get_output_embeddings(), nn.Linear):
        return "CAUSAL_LM", None
    if isinstance(getattr(model, REWARD_HEAD, None), nn.Module):
        return "TOKEN_CLS", [REWARD_HEAD]
    raise ValueError(f"model: {type(model).__name__} is neither a causal LM nor a token reward model; selpo's LoRA "
                     "takes those two")


def add_adapter(model: nn.Module, config: LoopConfig, section: str) -> None:
    """Injects a fresh LoRA adapter (``config.lora_rank``, ``lora_alpha``, ``lora_dropout`` on the modules named
    in ``lora_targets``) into ``model`` and freezes every other weight; a model that carries one already
    (``load_adapter``) has that adapter made trainable instead. ``section`` names the config section in errors."""
    from peft import LoraConfig, get_peft_model

    task, whole = _task(model)
    if has_adapter(model):
        peft = _peft(model)
        for name, param in peft.named_parameters():
            param.requires_grad_("lora_" in name or ".modules_to_save." in name)
        _check_mergeable(model, config, section)
        return
    targets = _targets(config)
    head = model.get_output_embeddings()

    def modules(target: str) -> list[nn.Module]:  # PEFT's rule for a list of targets: the name, or its last parts
        return [m for name, m in model.named_modules() if name == target or name.endswith(f".{target}")]

    found = {target: modules(target) for target in targets}
    if any(module is head for matched in found.values() for module in matched):
        raise ValueError(f"{section}.lora_targets ({config.lora_targets!r}) names the output head, which LoRA keeps "
                         "frozen; name the attention and MLP projections")
    missing = [target for target, matched in found.items() if not matched]
    if missing:
        raise ValueError(f"{section}.lora_targets: {', '.join(missing)} names no module of {type(model).__name__}")
    lora_config = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=targets, modules_to_save=whole, task_type=task)
    with _quiet_peft():
        _keep(model, get_peft_model(model, lora_config))
    _check_mergeable(model, config, section)


def _check_mergeable(model: nn.Module, config: LoopConfig, section: str) -> None:
    """With ``lora_merge``, every adapted layer must be a linear one (``merged_state_dict`` folds B A into a
    weight matrix): said before any training, not when the merged folder is written at its end."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    other = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
             if isinstance(m, LoraLayer) and not isinstance(m, Linear)]
    if config.lora_merge and other:
        raise ValueError(f"{section}.lora_merge: merges LoRA on linear layers only; {section}.lora_targets adapts "
                         f"{', '.join(other)}")


@contextlib.contextmanager
def _quiet_peft():
    """PEFT (0.21) reads transformers' (5.x) deprecated ``is_gradient_checkpointing`` when it wraps a model; the
    FutureWarning that raises is about their versions, nothing a user of selpo can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _keep(model: nn.Module, peft) -> None:
    """Keeps ``peft`` beside ``model``, with the absolute folder of the base named in its config (what
    ``load_adapter`` reads back, from any working directory)."""
    name = model.__dict__.get("name_or_path") or None
    if name is not None:
        peft.peft_config[peft.active_adapter].base_model_name_or_path = str(Path(name).resolve())
    model.__dict__[PEFT] = peft


def merge_adapter(model: nn.Module) -> None:
    """Folds ``model``'s adapter into its base weights and removes it (PEFT's ``merge_and_unload``), every weight
    trainable again: the model a full training continues from."""
    _peft(model).merge_and_unload()
    del model.__dict__[PEFT]
    model.requires_grad_(True)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """Within the block, ``model`` computes as its base alone: the adapter's layers (and a reward model's trained
    head, PEFT's ``modules_to_save``) are switched off, and back on when the block ends."""
    with _peft(model).disable_adapter():
        yield model


def adapter_base(path: str | Path) -> str | None:
    """The base model folder an adapter folder names (its ``adapter_config.json``), or None for any other path."""
    config = Path(path).expanduser() / CONFIG_FILE
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"model: {config} names no base model (base_model_name_or_path)")
    return base


def load_adapter(model: nn.Module, folder: str | Path) -> None:
    """Loads the adapter saved in ``folder`` (``save_adapter``) onto ``model``, its base, for inference: every
    weight frozen (``add_adapter`` makes the adapter trainable again)."""
    from peft import PeftModel

    with _quiet_peft():
        _keep(model, PeftModel.from_pretrained(model, str(folder), is_trainable=False))


def adapts(model: nn.Module, base: str) -> bool:
    """Whether ``model`` is a LoRA adapter on the model folder ``base`` (``selpo.models.resolve_model_path``'s
    answer): its base weights are then that model's, and disabling the adapter gives it back without loading it."""
    if not has_adapter(model):
        return False
    peft = _peft(model)
    named = peft.peft_config[peft.active_adapter].base_model_name_or_path
    return named is not None and Path(named).resolve() == Path(base).resolve()


def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], tokenizer, out: Path) -> None:
    """Writes ``model``'s adapter (and the tokenizer) into the folder ``out``, which ``PeftModel.from_pretrained``
    and ``selpo.models.load_causal_lm`` read back onto the base: no base weight in it. ``state``: the model's full
    state dict (``Accelerator.get_state_dict``, which gathers FSDP's shards), where the adapter's values are read."""
    peft = _peft(model)
    peft.save_pretrained(str(out), state_dict={f"base_model.model.{k}": v for k, v in state.items()})
    tokenizer.save_pretrained(out)


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model``'s weights under the names of the model without its adapter, from its full ``state`` (as
    ``save_adapter`` reads it): each adapted layer's base weight plus its LoRA update (PEFT's ``get_delta_weight``
    for a linear layer: B A, transposed for a fan-in-fan-out layer, times the scaling; here in float32), a reward
    head its trained copy. Computed beside the model: the model is left as it is (an in-place merge and unmerge
    would round its base weights)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    adapter = _peft(model).active_adapter
    merged, replaced = {}, []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                weight = state[f"{name}.base_layer.weight"]
                a, b = (state[f"{name}.lora_{x}.{adapter}.weight"].float() for x in "AB")
                delta = (b @ a) * module.scaling[adapter]
                merged[f"{name}.weight"] = weight + (delta.T if module.fan_in_fan_out else delta).to(weight.dtype)
                if f"{name}.base_layer.bias" in state:
                    merged[f"{name}.bias"] = state[f"{name}.base_layer.bias"]
            elif isinstance(module, ModulesToSaveWrapper):
                kept = f"{name}.modules_to_save.{adapter}."
                merged.update({f"{name}.{k.removeprefix(kept)}": v for k, v in state.items() if k.startswith(kept)})
            else:
                continue
            replaced.append(f"{name}.")
        merged.update({k: v for k, v in state.items() if not k.startswith(tuple(replaced))})
    return merged
