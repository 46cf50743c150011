"""Host synchronisations of each public op: a fixed, small number per call, whatever the size of the batch.

On a GPU each one stalls the CPU until the device catches up. They are counted as the ATen calls that hand a
device value to the host (``nonzero``, whose output size is data-dependent, and ``_local_scalar_dense``,
behind ``.item()``, ``int()`` and ``bool()``), plus ``Tensor.tolist``, which PyTorch does not dispatch, and
the host-to-device copies (a blocking copy from pageable host memory waits for the stream too).
"""

import pytest
import torch
from conftest import BACKENDS, DEVICE
from helpers import cu_seqlens
from torch.utils._python_dispatch import TorchDispatchMode

from selpo.kernels import ledger, linear_logprobs, linear_selective_loss, logprobs_from_logits, token_scores, topk_mask
from selpo.kernels.streaming import plan

SYNCING = {"nonzero", "_local_scalar_dense", "item", "is_nonzero", "equal", "masked_select", "unique", "_unique2"}
COPIES = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"}


class CountSyncs(TorchDispatchMode):
    """Counts the host synchronisations made inside the block (``self.calls``: their names, in order), the
    host-to-device copies among them.

    A copy is host data reaching a tensor on the tests' device: a tensor made there from Python values (aten
    ``lift_fresh``, behind ``torch.tensor``), or a copy from a CPU tensor to another device. On a CPU the host
    is the device, so each tensor made from Python values counts, as it would be a copy on a GPU: the count is
    the same on both."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.calls, self.inside_tolist = [], False
        tolist = torch.Tensor.tolist

        def counted(tensor):
            # A torch-function mode (a default device set, as SELPO_TEST_DEVICE=cuda does) calls the patched
            # method again from inside the original: one call, counted once.
            if self.inside_tolist:
                return tolist(tensor)
            self.calls.append("tolist")
            self.inside_tolist = True
            try:
                return tolist(tensor)
            finally:
                self.inside_tolist = False

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.calls.append(name)
        out = func(*args, **(kwargs or {}))
        if name == "lift_fresh" and out.device.type == torch.device(DEVICE).type:
            self.calls.append(name)
        elif name in COPIES and out.device.type != "cpu" and (args[1] if name == "copy_" else args[0]).is_cpu:
            self.calls.append(name)
        return out


def syncs(monkeypatch, fn) -> list[str]:
    with CountSyncs(monkeypatch) as counter:
        fn()
    monkeypatch.undo()
    return counter.calls


def batch(pairs: int, length: int = 9, d: int = 16, v: int = 100):
    n = 2 * pairs * length
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[::7] = -100
    return hidden, weight, targets, cu_seqlens([length] * (2 * pairs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs", [2, 9])
def test_linear_logprobs_and_token_scores(backend, pairs, monkeypatch):
    """One to check the targets, one for the rows to compute (a data-dependent count); the backward: one,
    for the rows with gradient."""
    hidden, weight, targets, _ = batch(pairs)
    out = {}
    assert syncs(monkeypatch, lambda: out.update(logp=linear_logprobs(hidden, weight, targets, backend=backend))) \
        == ["_local_scalar_dense", "nonzero"]
    assert syncs(monkeypatch, lambda: out["logp"].sum().backward()) == ["nonzero"]
    h, w = hidden.detach(), weight.detach()
    assert syncs(monkeypatch, lambda: token_scores(h, w, h, w, targets, backend=backend)) \
        == ["_local_scalar_dense", "nonzero"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["sepo", "dpo", "simpo"])
@pytest.mark.parametrize("pairs", [2, 9])
def test_linear_selective_loss(backend, loss, pairs, monkeypatch):
    """Targets and boundaries checked (one each), every response holding a selected token (sepo, simpo: one),
    the selected rows (one) and their boundaries, which cut the work into chunks of pairs (one); the
    gradients are formed there, so the backward has none, and no chunk adds any: the chunks' boundaries reach
    the device in one copy (lift_fresh), however many chunks (here about one per pair)."""
    hidden, weight, targets, cu = batch(pairs)
    monkeypatch.setattr(plan, "LOSS_BUFFER_BYTES", dict.fromkeys(("cpu", "cuda"), 8 * weight.shape[0] * 4))
    mask = torch.rand(hidden.shape[0]) < 0.4
    mask[cu[:-1].long()] = True
    inputs = {"ref_logps": torch.randn(hidden.shape[0])} if loss == "dpo" else {}
    out = {}

    def call():
        with ledger.counting() as out["book"]:
            out["loss"] = linear_selective_loss(hidden, weight, targets, cu, mask=mask, loss=loss, backend=backend,
                                                **inputs)[0]

    counting = ["nonzero"] if loss in ("sepo", "simpo") else []
    assert syncs(monkeypatch, call) == ["_local_scalar_dense", "tolist", *counting, "nonzero", "tolist", "lift_fresh"]
    assert len([e for e in out["book"].gemms() if e.name == "logits"]) >= pairs // 2  # several chunks
    assert syncs(monkeypatch, lambda: out["loss"].backward()) == []


def test_a_tolist_counts_once_under_a_default_device(monkeypatch):
    """A default device is a torch-function mode, which calls the patched ``tolist`` again from inside the
    original (seen on a GPU, where the tests set one): the counter must not count that call twice."""
    cu = cu_seqlens([3, 4])
    with torch.device(cu.device):
        assert syncs(monkeypatch, lambda: cu.tolist()) == ["tolist"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_mask_and_logprobs_from_logits(backend, monkeypatch):
    scores, cu = torch.randn(90), cu_seqlens([30, 20, 40])
    assert len(syncs(monkeypatch, lambda: topk_mask(scores, cu, 0.3, backend=backend))) <= 4
    logits, targets = torch.randn(12, 50), torch.randint(0, 50, (12,))
    assert len(syncs(monkeypatch, lambda: logprobs_from_logits(logits, targets, backend=backend))) <= 2
