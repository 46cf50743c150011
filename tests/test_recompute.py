"""selpo.recompute: checkpointing that keeps the attention kernels' outputs runs each layer's attention kernel
once in a forward and backward (full checkpointing: twice) and gives the gradients of training without
checkpointing, in float32 and under bf16 autocast, on padded batches; a model with eager attention is
checkpointed as before; the policy keeps flash-attn's kernels by name."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from selpo.models import load_causal_lm
from selpo.recompute import ATTENTION_OPS, _keep_attention, enable_gradient_checkpointing, is_checkpointing
from selpo.testing import tiny_model_dir


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched under it by name (an op a checkpoint reads from its cache never gets here)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))

    def attention_calls(self) -> int:
        return sum(n for name, n in self.counts.items() if name in ATTENTION_OPS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("recompute"))


def _padded_batch():
    ids = torch.randint(3, 50, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as the trainer's prompts have
    mask[2, :1] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _loss_and_grads(model, autocast: bool):
    ids, mask, labels = _padded_batch()
    model.zero_grad(set_to_none=True)
    counter = OpCounter()
    with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, counter.attention_calls()


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("keep", [True, False], ids=["keep-attention", "full"])
def test_checkpointing_runs_attention_once_when_kept_with_the_same_gradients(model_dir, keep, autocast):
    stored, _ = load_causal_lm(model_dir)
    loss, grads, calls = _loss_and_grads(stored.train(), autocast)
    layers = stored.config.num_hidden_layers
    assert calls == layers
    recomputed, _ = load_causal_lm(model_dir)
    enable_gradient_checkpointing(recomputed.train(), keep_attention=keep)
    got_loss, got_grads, got_calls = _loss_and_grads(recomputed, autocast)
    assert got_calls == (layers if keep else 2 * layers)
    tol = dict(rtol=1e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, loss, **tol)
    assert grads.keys() == got_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, **tol, msg=name)


def test_eager_attention_is_checkpointed_as_without_the_option(model_dir):
    runs = []
    for keep in (True, False):
        model, _ = load_causal_lm(model_dir)
        model.set_attn_implementation("eager")
        enable_gradient_checkpointing(model.train(), keep_attention=keep)
        runs.append(_loss_and_grads(model, autocast=False))
    (loss, grads, calls), (full_loss, full_grads, full_calls) = runs
    assert calls == full_calls == 0
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=0, atol=0)


class _NamedOp:
    def __init__(self, name):
        self._name = name

    def name(self):
        return self._name


@pytest.mark.parametrize("name", ["flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward",
                                  "aten::_scaled_dot_product_efficient_attention"])
def test_the_policy_keeps_every_attention_kernel_and_recomputes_the_rest(name):
    assert _keep_attention(None, _NamedOp(name)) == CheckpointPolicy.MUST_SAVE
    for other in ("aten::mm", "aten::_scaled_dot_product_flash_attention_backward", "flash_attn::_flash_attn_backward"):
        assert _keep_attention(None, _NamedOp(other)) == CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("newer", [True, False], ids=["is_activation_checkpointing", "transformers-5.17"])
def test_is_checkpointing_reads_the_installed_transformers_name(model_dir, newer, monkeypatch):
    """transformers 5.17 (a GPU image's) has ``is_gradient_checkpointing`` alone; later ones add
    ``is_activation_checkpointing`` and deprecate the other: either way the answer follows the model."""
    model, _ = load_causal_lm(model_dir)
    if not newer:
        for cls in type(model).__mro__:  # the property under its old name alone, as 5.17 has it
            if "is_activation_checkpointing" in vars(cls):
                monkeypatch.setattr(cls, "is_gradient_checkpointing", vars(cls)["is_activation_checkpointing"])
                monkeypatch.delattr(cls, "is_activation_checkpointing")
        assert not hasattr(model, "is_activation_checkpointing")
    assert is_checkpointing(model) is False
    enable_gradient_checkpointing(model)
    assert is_checkpointing(model) is True
