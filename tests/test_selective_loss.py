"""linear_selective_loss (the trainer's hot path) against full logits in float64: loss, metrics, gradients."""

import pytest
import torch
from conftest import BACKENDS
from helpers import TOL, cu_seqlens

from selpo.kernels import ledger, linear_selective_loss
from selpo.kernels.streaming import passes_torch, plan

LOSSES = [("sepo", {"gamma": 1.7, "margin": 0.2}), ("dpo", {"beta": 0.3}), ("simpo", {"beta": 2.0, "gamma": 0.4}),
          ("weighted_nll", {})]


def make_batch(lengths, d=13, v=71, ignored=(2,)):
    n = sum(lengths)
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight = torch.randn(v, d, dtype=torch.float64) * 0.4
    targets = torch.randint(0, v, (n,))
    targets[list(i for i in ignored if i < n)] = -100
    extra = {"ref_logps": torch.randn(n, dtype=torch.float64) - 3, "weights": torch.rand(n, dtype=torch.float64)}
    return hidden, weight, targets, cu_seqlens(lengths), extra


def run(backend, dtype, hidden, weight, targets, cu, loss, options, extra, bias=None, upstream=1.0, **select):
    leaves = [t.to(dtype).clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    kw = {"ref_logps": extra["ref_logps"].to(dtype)} if loss == "dpo" else {}
    if loss == "weighted_nll":
        kw["weights"] = extra["weights"].to(dtype)
    value, metrics = linear_selective_loss(leaves[0], leaves[1], targets, cu, loss=loss, bias=leaves[2],
                                           backend=backend, **select, **kw, **options)
    (value * upstream).backward()
    return [value.detach().double()] + [t.grad.double() for t in leaves if t is not None], metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss, options", LOSSES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_full_logits(backend, loss, options, with_bias):
    lengths = [5, 9, 1, 7, 6, 3, 8, 4]  # 4 pairs, a one-token chosen response
    hidden, weight, targets, cu, extra = make_batch(lengths)
    bias = torch.randn(weight.shape[0], dtype=torch.float64) if with_bias else None
    scores = torch.randn(hidden.shape[0])
    select = {"scores": scores, "ratio": 0.3}
    dtype = torch.float64 if backend == "torch" else torch.float32
    got, got_metrics = run(backend, dtype, hidden, weight, targets, cu, loss, options, extra, bias, **select)
    want, want_metrics = run("naive", torch.float64, hidden, weight, targets, cu, loss, options, extra, bias, **select)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= tol * max(1.0, w.abs().max().item())
    assert got_metrics.keys() == want_metrics.keys()
    for k in want_metrics:
        assert torch.allclose(got_metrics[k].double(), want_metrics[k].double(), atol=tol, rtol=tol), k
    assert got_metrics["selected"].tolist() == [1, 2, 1, 2, 1, 1, 2, 1]  # max(1, floor(0.3 * n_valid))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_and_upstream_gradient(backend):
    """A given mask, a loss scaled before backward, and a pair longer than a whole chunk."""
    lengths = [30, 2, 1, 25]
    hidden, weight, targets, cu, extra = make_batch(lengths, ignored=())
    mask = torch.rand(hidden.shape[0]) < 0.5
    mask[cu[:-1].long()] = True
    dtype = torch.float64 if backend == "torch" else torch.float32
    got, _ = run(backend, dtype, hidden, weight, targets, cu, "sepo", {}, extra, upstream=3.0, mask=mask)
    want, _ = run("naive", torch.float64, hidden, weight, targets, cu, "sepo", {}, extra, upstream=3.0, mask=mask)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= tol * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_path_projects_only_selected_tokens_once(backend, monkeypatch):
    """Three GEMMs per chunk of whole pairs, over its selected tokens only: the logits of each selected token
    are computed exactly once, and the backward only scales the gradients already formed."""
    v = 50
    monkeypatch.setattr(plan, "LOSS_BUFFER_BYTES", {"cpu": 8 * v * 4, "cuda": 8 * v * 4})  # 8 rows per chunk
    lengths = [40, 12, 7, 20, 33, 9, 16, 18]
    hidden, weight, targets, cu, _ = make_batch(lengths, v=v, ignored=())
    hidden, weight = hidden.float(), weight.float()
    scores = torch.randn(hidden.shape[0])
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with ledger.counting() as book:
        value, metrics = linear_selective_loss(h, w, targets, cu, scores=scores, ratio=0.3, backend=backend)
    with ledger.counting() as backward_book:
        value.backward()
    selected = sum(max(1, int(0.3 * n)) for n in lengths)
    logits = [e for e in book.gemms() if e.name == "logits"]
    assert int(metrics["selected"].sum()) == selected and len(logits) > 1
    assert sum(e.flops for e in logits) == 2 * selected * v * hidden.shape[1]
    assert book.flops == 3 * 2 * selected * v * hidden.shape[1]
    assert [e.name for e in backward_book.entries] == ["scale_grads", "scale_grads"] and not backward_book.flops


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_and_no_grad(backend):
    hidden, weight, targets, cu, extra = make_batch([4, 6, 5, 3])
    dtype = torch.float64 if backend == "torch" else torch.float32
    select = {"scores": torch.randn(hidden.shape[0]), "ratio": 0.5}
    head = {"softcap": 2.0, "temperature": 0.7}
    got, _ = run(backend, dtype, hidden, weight, targets, cu, "sepo", head, extra, **select)
    want, _ = run("naive", torch.float64, hidden, weight, targets, cu, "sepo", head, extra, **select)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= tol * max(1.0, w.abs().max().item())
    with torch.no_grad():
        value, _ = linear_selective_loss(hidden.to(dtype).requires_grad_(), weight.to(dtype), targets, cu,
                                         backend=backend, **select, **head)
    assert not value.requires_grad and abs(value.item() - want[0].item()) <= tol


def test_nan_hidden_gives_nan_loss_and_gradients():
    hidden, weight, targets, cu, _ = make_batch([4, 4], ignored=())
    hidden[1, 0] = float("nan")
    h = hidden.clone().requires_grad_()
    value, _ = linear_selective_loss(h, weight, targets, cu, mask=torch.ones(8, dtype=torch.bool), backend="torch")
    value.backward()
    assert torch.isnan(value) and torch.isnan(h.grad).any()


@pytest.mark.parametrize("kwargs, match", [
    ({"mask": torch.ones(6, dtype=torch.bool), "scores": torch.zeros(6), "ratio": 0.5}, "either mask or scores"),
    ({"scores": torch.zeros(6)}, "ratio is required"),
    ({"loss": "dpo"}, "ref_logps is required"),
    ({"loss": "weighted_nll"}, "weights is required"),
    ({"loss": "ipo"}, "loss must be one of"),
    ({"cu_seqlens": torch.tensor([0, 2, 3, 6], dtype=torch.int32)}, "even number of segments"),
    ({"cu_seqlens": torch.tensor([0, 2, 4, 5], dtype=torch.int32)}, "must end at N=6"),
    ({"mask": torch.tensor([True, False, False, True, True, True])}, "mask selects no token of segment 1"),
    ({"scores": torch.zeros(6), "ratio": 1.5}, "ratio must lie in"),
])
def test_bad_input(kwargs, match):
    args = {"hidden": torch.zeros(6, 4), "weight": torch.zeros(5, 4), "targets": torch.tensor([0, 1, 2, 3, 4, 0]),
            "cu_seqlens": torch.tensor([0, 1, 3, 4, 6], dtype=torch.int32)}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_selective_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("cu_seqlens"),
                              **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    """Half inputs: accumulation in fp32, results within the dtype's tolerance of float64 math on the same inputs."""
    hidden, weight, targets, cu, extra = make_batch([6, 3, 4, 7])
    hidden, weight = hidden.to(dtype).double(), weight.to(dtype).double()  # the rounded inputs, exactly
    select = {"scores": torch.randn(hidden.shape[0]), "ratio": 0.5}
    got, _ = run(backend, dtype, hidden, weight, targets, cu, "sepo", {}, extra, **select)
    want, _ = run("naive", torch.float64, hidden, weight, targets, cu, "sepo", {}, extra, **select)
    assert got[0].dtype == torch.float64
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= TOL[dtype] * max(1.0, w.abs().max().item())


def test_second_backward_is_refused():
    """The gradients formed in the forward are scaled in place and handed over once: a second backward of the
    same loss (retain_graph) is an error, never doubly scaled gradients."""
    hidden, weight, targets, cu, _ = make_batch([4, 6, 5, 3], ignored=())
    h = hidden.clone().requires_grad_()
    value, _ = linear_selective_loss(h, weight, targets, cu, backend="torch")
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="handed over by the first backward"):
        value.backward()


@pytest.mark.parametrize("loss, options", LOSSES)
@pytest.mark.parametrize("head", [{}, {"softcap": 2.0, "temperature": 0.7}])
def test_passes_in_row_blocks(loss, options, head, monkeypatch):
    """The CPU passes walk a chunk's logits in blocks of rows (the last one partial): the same loss and
    gradients as full logits, over several chunks of pairs."""
    monkeypatch.setattr(passes_torch, "BLOCK_BYTES", 3 * 71 * 8)  # three float64 rows of the vocabulary
    monkeypatch.setattr(plan, "LOSS_BUFFER_BYTES", {"cpu": 16 * 71 * 8, "cuda": 16 * 71 * 8})
    lengths = [30, 2, 1, 25, 9, 14, 6, 11]
    hidden, weight, targets, cu, extra = make_batch(lengths)
    select = {"scores": torch.randn(hidden.shape[0]), "ratio": 0.6}
    got, _ = run("torch", torch.float64, hidden, weight, targets, cu, loss, {**options, **head}, extra, upstream=2.0,
                 **select)
    want, _ = run("naive", torch.float64, hidden, weight, targets, cu, loss, {**options, **head}, extra, upstream=2.0,
                  **select)
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-10 * max(1.0, w.abs().max().item())
