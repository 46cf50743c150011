"""A resume under FSDP1 restores the optimizer's state: Accelerate's FSDP1 loader of a sharded checkpoint fills only
the entries the optimizer already has, so a fresh optimizer kept none (AdamW's moments reset: 2.4e-3 from the whole
run on an H200, 2026-12-04) until ``selpo.checkpoint.load`` gave it its state first (``init_optimizer_state``).

Accelerate runs FSDP only on accelerators, but torch's FSDP1 runs on CPU over gloo: one process here, wrapped as
``accelerate launch --use_fsdp --fsdp_version 1`` wraps it (NO_SHARD at world size 1, sharded state dicts), saved and
loaded through the same functions of ``accelerate.utils.fsdp_utils`` that ``Accelerator.save_state``/``load_state``
call."""

from __future__ import annotations

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

from selpo.checkpoint import init_optimizer_state
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

    plugin = types.SimpleNamespace(fsdp_version=1, state_dict_type=StateDictType.SHARDED_STATE_DICT,
                                   state_dict_config=ShardedStateDictConfig(offload_to_cpu=True),
                                   optim_state_dict_config=ShardedOptimStateDictConfig(offload_to_cpu=True))
    accelerator = types.SimpleNamespace(process_index=0, is_main_process=True, wait_for_everyone=lambda: None)
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
