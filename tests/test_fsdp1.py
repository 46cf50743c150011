"""selpo's trainer under torch's FSDP1, on CPU over gloo: Accelerate runs FSDP only on accelerators, but torch's FSDP1
runs on CPU; one process here, wrapped as ``accelerate launch --use_fsdp --fsdp_version 1`` wraps it (NO_SHARD at
world size 1, ``use_orig_params=True``, sharded state dicts), saved and loaded through the same functions of
``accelerate.utils.fsdp_utils`` that ``Accelerator.save_state``/``load_state`` call.

- A resume restores the optimizer's state: Accelerate's FSDP1 loader of a sharded checkpoint fills only the entries
  the optimizer already has, so a fresh optimizer kept none (AdamW's moments reset: 2.4e-3 from the whole run on an
  H200, 2026-12-04) until ``selpo.checkpoint.load`` gave it its state first (``init_optimizer_state``).
- A LoRA adapter on a model with tied embeddings trains: FSDP1 broke at the second forward (on an H200, 2026-12-04,
  ``benchmarks/fsdp_check.py --lora``) until ``selpo.fsdp1`` left the frozen tied modules out of it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import fsdp_utils
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import (
    ShardedOptimStateDictConfig,
    ShardedStateDictConfig,
    ShardingStrategy,
    StateDictType,
)
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from selpo import lora
from selpo.checkpoint import init_optimizer_state
from selpo.config import LoopConfig
from selpo.fsdp1 import frozen_modules, ignoring_frozen
from selpo.models import load_causal_lm
from selpo.testing import tiny_model_dir
from selpo.trainer import param_groups


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(torch.tanh(self.linear(x)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks, self.head = nn.ModuleList([Block(), Block()]), nn.Linear(8, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _plugin(ignored_modules=None):
    """The fields of Accelerate's FSDP1 plugin that its sharded savers and selpo.fsdp1 read."""
    return types.SimpleNamespace(fsdp_version=1, state_dict_type=StateDictType.SHARDED_STATE_DICT,
                                 state_dict_config=ShardedStateDictConfig(offload_to_cpu=True),
                                 optim_state_dict_config=ShardedOptimStateDictConfig(offload_to_cpu=True),
                                 ignored_modules=ignored_modules, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                 reshard_after_forward=None)


_ACCELERATOR = types.SimpleNamespace(process_index=0, is_main_process=True, wait_for_everyone=lambda: None)


@pytest.fixture
def gloo(tmp_path, monkeypatch):
    monkeypatch.setattr(fsdp_utils, "logger", logging.getLogger("fsdp_utils"))  # Accelerate's wants its state
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("use_orig_params", [True, False])
@pytest.mark.parametrize("fresh_state", ["selpo", "none"])
def test_an_fsdp1_resume_restores_the_optimizer_and_continues_exactly(gloo, tmp_path, use_orig_params,
                                                                      fresh_state):
    torch.manual_seed(0)
    initial = Tiny().state_dict()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, 8, generator=g), torch.randn(6, 4, 1, generator=g)

    def wrapped():
        model = Tiny()
        model.load_state_dict(initial)
        model = FSDP(model, sharding_strategy=ShardingStrategy.NO_SHARD, use_orig_params=use_orig_params,
                     device_id=torch.device("cpu"),
                     auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={Block}))
        return model, torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, foreach=True)  # built after wrapping

    def steps(model, optimizer, which):
        for i in which:
            optimizer.zero_grad()
            ((model(x[i]) - y[i]) ** 2).mean().backward()
            optimizer.step()

    def state(optimizer):
        return [dict(optimizer.state[p]) for group in optimizer.param_groups for p in group["params"]]

    def weights(model):
        with FSDP.summon_full_params(model):
            return {k: v.detach().clone() for k, v in model.named_parameters()}

    plugin, accelerator = _plugin(), _ACCELERATOR
    model, optimizer = wrapped()
    steps(model, optimizer, range(2))
    fsdp_utils.save_fsdp_model(plugin, accelerator, model, str(tmp_path))
    fsdp_utils.save_fsdp_optimizer(plugin, accelerator, optimizer, model, str(tmp_path))
    saved = state(optimizer)
    steps(model, optimizer, range(2, 5))
    whole = weights(model)

    model, optimizer = wrapped()
    if fresh_state == "selpo":
        init_optimizer_state(optimizer)
        assert all(torch.equal(v, weights(model)[k]) for k, v in weights(wrapped()[0]).items())  # not moved
    fsdp_utils.load_fsdp_model(plugin, accelerator, model, str(tmp_path))
    fsdp_utils.load_fsdp_optimizer(plugin, accelerator, optimizer, model, str(tmp_path))
    loaded = state(optimizer)
    steps(model, optimizer, range(2, 5))
    resumed = weights(model)
    if fresh_state == "none":  # Accelerate's loader alone: nothing came back (once this fails, Accelerate fills a
        # fresh optimizer itself and init_optimizer_state can go)
        assert all(not state for state in loaded) and any(not torch.equal(whole[k], resumed[k]) for k in whole)
        return
    assert len(loaded) == len(saved) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(saved, loaded))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def _lora_llama(folder):
    """The tiny Llama (tied embeddings) with a fresh LoRA adapter, the same on every call."""
    model, _ = load_causal_lm(str(folder), device="cpu")
    torch.manual_seed(0)
    lora.add_adapter(model, LoopConfig(lora_rank=4, lora_dropout=0.0), "train")
    return model


def _lora_steps(model, optimizer, ids: torch.Tensor) -> None:
    """One AdamW step per batch of ``ids`` [steps, rows, tokens]: next-token cross-entropy, the rows' mean."""
    for batch in ids:
        optimizer.zero_grad()
        logits = model(input_ids=batch).logits[:, :-1].float()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()


def test_the_frozen_modules_are_a_lora_models_base_layers_norms_embedding_and_head(tmp_path):
    folder = tiny_model_dir(tmp_path)
    full, _ = load_causal_lm(str(folder), device="cpu")
    assert frozen_modules(full) == []  # trained: FSDP1 wraps it all
    model = _lora_llama(folder)
    found = {id(m) for m in frozen_modules(model)}
    expected = [model.get_input_embeddings(), model.get_output_embeddings(), model.model.norm] + [
        m for name, m in model.named_modules() if name.endswith(("base_layer", "layernorm"))]
    assert len(expected) == 3 + 2 * (7 + 2) and found == {id(m) for m in expected}
    assert not any(id(m) in found for name, m in model.named_modules() if "lora_" in name)

    plugin = _plugin(ignored_modules=r".*\.layers\.0\.mlp")  # a user's pattern is kept
    with ignoring_frozen(plugin, model, num_processes=1):
        ignored = [id(m) for m in plugin.ignored_modules]
        assert ignored[0] == id(model.model.layers[0].mlp) and set(ignored[1:]) == found
    assert plugin.ignored_modules == r".*\.layers\.0\.mlp"
    with ignoring_frozen(plugin, model, num_processes=2):  # sharded: FSDP1 shards the frozen weights too
        assert plugin.ignored_modules == r".*\.layers\.0\.mlp"
    plugin.sharding_strategy = ShardingStrategy.NO_SHARD
    with ignoring_frozen(plugin, model, num_processes=2):
        assert len(plugin.ignored_modules) == 1 + len(found)


@pytest.mark.parametrize("ignore", [True, False])
def test_a_lora_adapter_on_tied_embeddings_trains_and_resumes_under_unsharded_fsdp1(gloo, tmp_path, ignore):
    folder = tiny_model_dir(tmp_path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 100, (5, 3, 12), generator=g)

    def wrapped():
        model, plugin = _lora_llama(folder), _plugin()
        with (ignoring_frozen(plugin, model, num_processes=1) if ignore else contextlib.nullcontext()):
            model = FSDP(model, sharding_strategy=ShardingStrategy.NO_SHARD, use_orig_params=True,
                         device_id=torch.device("cpu"), ignored_modules=plugin.ignored_modules,
                         auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                            transformer_layer_cls={LlamaDecoderLayer}))
        return model, torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, foreach=True)

    def steps(model, optimizer, which):
        _lora_steps(model, optimizer, ids[list(which)])

    def adapter(model):
        with FSDP.summon_full_params(model):
            return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}

    plain = _lora_llama(folder)
    steps(plain, torch.optim.AdamW(param_groups(plain, 0.1), lr=1e-2, foreach=True), range(5))
    expected = {k: v.detach() for k, v in plain.named_parameters() if "lora_" in k}
    model, optimizer = wrapped()
    if not ignore:  # torch's FSDP1 on a frozen tied pair: once this passes, selpo.fsdp1 can go
        with pytest.raises(AssertionError, match="prim_param"):
            steps(model, optimizer, range(2))
        return
    steps(model, optimizer, range(2))
    fsdp_utils.save_fsdp_model(_plugin(), _ACCELERATOR, model, str(tmp_path / "ckpt"))
    fsdp_utils.save_fsdp_optimizer(_plugin(), _ACCELERATOR, optimizer, model, str(tmp_path / "ckpt"))
    steps(model, optimizer, range(2, 5))
    whole = adapter(model)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT):  # what Accelerate gathers to save the model
        gathered = {k.replace("_fsdp_wrapped_module.", "") for k in model.state_dict()}
    assert gathered == set(_lora_llama(folder).state_dict())  # the modules left out included
    assert whole.keys() == {k.replace("_fsdp_wrapped_module.", "") for k in whole}  # use_orig_params: plain names
    assert whole.keys() == expected.keys() and expected["model.layers.0.self_attn.q_proj.lora_B"
                                                        ".default.weight"].abs().max() > 1e-3
    assert all(torch.allclose(whole[k], expected[k], atol=1e-6, rtol=1e-5) for k in expected)

    model, optimizer = wrapped()
    init_optimizer_state(optimizer)
    fsdp_utils.load_fsdp_model(_plugin(), _ACCELERATOR, model, str(tmp_path / "ckpt"))
    fsdp_utils.load_fsdp_optimizer(_plugin(), _ACCELERATOR, optimizer, model, str(tmp_path / "ckpt"))
    steps(model, optimizer, range(2, 5))
    assert all(torch.equal(v, whole[k]) for k, v in adapter(model).items())


def _sharded_worker(rank: int, folder: str, out: str, ids: torch.Tensor) -> None:
    """One of two processes of FULL_SHARD FSDP1 over gloo, training the LoRA model on its half of each batch."""
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        model = FSDP(_lora_llama(folder), sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True,
                     device_id=torch.device("cpu"),
                     auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                        transformer_layer_cls={LlamaDecoderLayer}))
        optimizer = torch.optim.SGD(param_groups(model, 0.0), lr=1.0)
        _lora_steps(model, optimizer, ids[:, rank::2])
        with FSDP.summon_full_params(model):
            adapter = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
        if rank == 0:
            torch.save(adapter, f"{out}/adapter.pt")
    finally:
        dist.destroy_process_group()


def test_a_lora_adapter_on_tied_embeddings_trains_under_sharded_fsdp1_as_without_it(tmp_path):
    """Sharded over two processes, FSDP1 needs no workaround: the same adapter as one process without FSDP. Plain
    SGD: AdamW's first steps divide each gradient by its own size, making the rounding of the processes' reduction
    (5e-8 here) an lr-sized difference."""
    folder = tiny_model_dir(tmp_path)
    ids = torch.randint(4, 100, (3, 4, 12), generator=torch.Generator().manual_seed(1))
    torch.multiprocessing.spawn(_sharded_worker, args=(str(folder), str(tmp_path), ids), nprocs=2)
    plain = _lora_llama(folder)
    _lora_steps(plain, torch.optim.SGD(param_groups(plain, 0.0), lr=1.0), ids)
    sharded = torch.load(tmp_path / "adapter.pt")
    expected = {k: v.detach() for k, v in plain.named_parameters() if "lora_" in k}
    assert sharded.keys() == expected.keys() and max(float(v.abs().max()) for k, v in expected.items()
                                                      if "lora_B" in k) > 1e-3
    assert all(torch.allclose(sharded[k], expected[k], atol=1e-6, rtol=1e-5) for k in expected)
