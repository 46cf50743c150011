"""Adding a fused loss touches one file, this one: two toy losses, defined and registered here alone (one pairwise
with two per-token inputs of its own, one per sequence taking a mean), run through linear_selective_loss on every
backend against their float64 reference on full logits: loss, metrics and gradients."""

import pytest
import torch
import torch.nn.functional as F
from helpers import cu_seqlens

from selpo.kernels import linear_selective_loss, segment_sum
from selpo.kernels.losses import FusedLoss, Linear, Option, register


def toy_pair_full(logps, cu_seqlens, mask, backend, *, token_weights, bonus, scale, offset):
    """Bradley-Terry over rewards ``scale * sum of (token_weights * logp + bonus)`` of the selected tokens."""
    terms = torch.where(mask, token_weights * logps + bonus, 0.0)
    rewards = scale * segment_sum(terms, cu_seqlens, backend=backend)
    pairs = rewards.shape[0] // 2
    chosen, rejected = rewards[:pairs], rewards[pairs:]
    margin = chosen - rejected
    metrics = {"chosen_reward": chosen.detach(), "rejected_reward": rejected.detach(), "margin": margin.detach(),
               "accuracy": (chosen > rejected).to(rewards.dtype)}
    return -F.logsigmoid(margin - offset).mean(), metrics


def toy_pair_compact(counts, *, token_weights, bonus, scale, offset):
    return Linear(scale=scale, slope=token_weights, shift=bonus, offset=offset)


def toy_mean_full(logps, cu_seqlens, mask, backend, *, token_weights, scale):
    """Per sequence, ``-scale`` times the mean over its selected tokens of ``token_weights * logp``."""
    sums = segment_sum(torch.where(mask, token_weights * logps, 0.0), cu_seqlens, backend=backend)
    cost = -scale * sums / segment_sum(mask.to(logps.dtype), cu_seqlens, backend=backend)
    return cost.mean(), {"cost": cost.detach()}


def toy_mean_compact(counts, *, token_weights, scale):
    return Linear(scale=-scale / counts, slope=token_weights)


register(FusedLoss("toy_pair", pairwise=True, full=toy_pair_full, compact=toy_pair_compact,
                   inputs=("token_weights", "bonus"),
                   options={"scale": Option(1.0, positive=True), "offset": Option(0.0)}))
register(FusedLoss("toy_mean", pairwise=False, full=toy_mean_full, compact=toy_mean_compact, mean=True, metric="cost",
                   inputs=("token_weights",), options={"scale": Option(2.0, positive=True)}))
CASES = [("toy_pair", {"scale": 0.7, "offset": 0.3}, ("token_weights", "bonus")),
         ("toy_pair", {}, ("token_weights", "bonus")),
         ("toy_mean", {"scale": 1.5}, ("token_weights",))]


def reference(loss, options, inputs, hidden, weight, bias, targets, cu, mask):
    """(loss, metrics, dL/dhidden, dL/dweight, dL/dbias) in float64 from full logits, through the loss's own
    definition (its ``full`` function, written above)."""
    hidden, weight, bias = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    valid = targets != -100
    logps = torch.log_softmax(hidden @ weight.T + bias, dim=1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    full = toy_pair_full if loss == "toy_pair" else toy_mean_full
    defaults = {"toy_pair": {"scale": 1.0, "offset": 0.0}, "toy_mean": {"scale": 2.0}}[loss]
    value, metrics = full(torch.where(valid, logps, 0.0), cu, mask & valid, "naive",
                          **{k: t.double() for k, t in inputs.items()}, **{**defaults, **options})
    value.backward()
    return value.detach(), metrics, hidden.grad, weight.grad, bias.grad


@pytest.mark.parametrize("backend", ["torch", "triton", "naive"])
@pytest.mark.parametrize("loss, options, names", CASES)
def test_a_loss_defined_here_runs_on_every_backend(backend, loss, options, names):
    lengths = [5, 9, 1, 7, 6, 3, 8, 4]  # 4 pairs, or 8 sequences
    n, d, v = sum(lengths), 11, 37
    hidden, weight, bias = torch.randn(n, d) * 0.8, torch.randn(v, d) * 0.5, torch.randn(v) * 0.3
    targets, cu = torch.randint(0, v, (n,)), cu_seqlens(lengths)
    targets[3] = -100
    mask = torch.rand(n) < 0.6
    mask[cu[:-1].long()] = True  # every response keeps its first token (a valid one)
    draw = {"token_weights": lambda: torch.rand(n, dtype=torch.float64) + 0.5,
            "bonus": lambda: torch.randn(n, dtype=torch.float64)}
    inputs = {name: draw[name]() for name in names}
    want = reference(loss, options, inputs, hidden, weight, bias, targets, cu, mask)

    dtype = torch.float32 if backend == "triton" else torch.float64
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    value, metrics = linear_selective_loss(leaves[0], leaves[1], targets, cu, mask=mask, loss=loss, bias=leaves[2],
                                           backend=backend, **{k: t.to(dtype) for k, t in inputs.items()}, **options)
    value.backward()
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    got = (value.detach(), metrics, *(t.grad for t in leaves))
    for g, w in zip(got[2:], want[2:]):
        assert (g.double() - w).abs().max().item() <= tol * max(1.0, w.abs().max().item())
    assert abs(got[0].item() - want[0].item()) <= tol * max(1.0, abs(want[0].item()))
    assert metrics.keys() == {*want[1], "selected"}
    for k, w in want[1].items():
        assert torch.allclose(metrics[k].double(), w.double(), atol=tol, rtol=tol), k
    assert metrics["selected"].tolist() == [int(c.sum()) for c in (mask & (targets != -100)).split(lengths)]


def test_a_loss_defined_here_is_checked_at_the_edge():
    """Its per-token inputs are required and checked, its options checked, by their names."""
    hidden, weight, targets = torch.randn(6, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    cu = cu_seqlens([1, 2, 1, 2])
    good = {"token_weights": torch.ones(6), "bonus": torch.zeros(6)}
    cases = [({"bonus": torch.zeros(6)}, ValueError, "token_weights is required for loss='toy_pair'"),
             ({**good, "bonus": torch.zeros(5)}, ValueError, r"bonus must have shape \[N\] = \[6\]"),
             ({**good, "scale": -1.0}, ValueError, "scale must be > 0"),
             ({**good, "beta": 1.0}, TypeError, r"loss='toy_pair' takes the options \['offset', 'scale'\]")]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            linear_selective_loss(hidden, weight, targets, cu, loss="toy_pair", backend="torch", **kwargs)
    with pytest.raises(ValueError, match="a loss named 'toy_pair' is registered already"):
        register(FusedLoss("toy_pair", pairwise=True, full=toy_pair_full, compact=toy_pair_compact))
