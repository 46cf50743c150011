"""The losses against float64 per-pair formulas written here, on every backend: loss, gradient, metrics."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cu_seqlens
from hypothesis import given, settings
from hypothesis import strategies as st

from selpo.kernels.losses import common, dpo_loss, sepo_loss, simpo_loss, spec, weighted_nll

BACKENDS = ["naive", "torch", "triton"]
LONG = 1100  # longer than one Triton block (1024), not a multiple of it


# ---- float64 references: one formula per pair (or sequence), by Python loops over slices ----

def split(x, lengths):
    return list(torch.split(x, lengths)) if x is not None else [None] * len(lengths)


def ref_pairs(rewards, offset):
    p = len(rewards) // 2
    margins = [rewards[i] - rewards[p + i] for i in range(p)]
    loss = sum(-F.logsigmoid(m - offset) for m in margins) / p
    return loss, torch.stack(rewards[:p]), torch.stack(rewards[p:])


def ref_sepo(lp, x, lengths, gamma, margin):
    return ref_pairs([gamma * s[m].mean() for s, m in zip(split(lp, lengths), split(x["mask"], lengths))], margin)


def ref_dpo(lp, x, lengths, beta):
    rewards = []
    for s, r, m in zip(split(lp, lengths), split(x["ref_logps"].double(), lengths), split(x["mask"], lengths)):
        keep = m if m is not None else torch.ones_like(s, dtype=torch.bool)
        rewards.append(beta * (s[keep] - r[keep]).sum())
    return ref_pairs(rewards, 0.0)


def ref_simpo(lp, x, lengths, beta, gamma):
    rewards = []
    for s, m in zip(split(lp, lengths), split(x["mask"], lengths)):
        rewards.append(beta * (s[m].mean() if m is not None else s.mean()))
    return ref_pairs(rewards, gamma)


def ref_nll(lp, x, lengths):
    nll = [-(w.double() * s).sum() for s, w in zip(split(lp, lengths), split(x["weights"], lengths))]
    return sum(nll) / len(nll), torch.stack(nll)


# name -> (call of the package, float64 reference, segment lengths to test, whether a mask may be given)
SEPO = dict(gamma=1.7, margin=0.3)
DPO = dict(beta=0.3)
SIMPO = dict(beta=2.5, gamma=0.4)
LOSSES = {
    "sepo": (lambda lp, x, cu, b: sepo_loss(lp, x["mask"], cu, backend=b, **SEPO),
             lambda lp, x, n: ref_sepo(lp, x, n, **SEPO),
             [[1, 1], [2, 3, 1, 4], [LONG, 1, 1030, 2]], [True]),
    "dpo": (lambda lp, x, cu, b: dpo_loss(lp, x["ref_logps"], cu, mask=x["mask"], backend=b, **DPO),
            lambda lp, x, n: ref_dpo(lp, x, n, **DPO),
            [[1, 0], [1, 1], [0, 3, 2, 0], [LONG, 1, 5, 1030]], [False, True]),
    "simpo": (lambda lp, x, cu, b: simpo_loss(lp, cu, mask=x["mask"], backend=b, **SIMPO),
              lambda lp, x, n: ref_simpo(lp, x, n, **SIMPO),
              [[1, 1], [2, 3, 1, 4], [LONG, 1, 1030, 2]], [False, True]),
    "weighted_nll": (lambda lp, x, cu, b: weighted_nll(lp, x["weights"], cu, backend=b),
                     lambda lp, x, n: ref_nll(lp, x, n),
                     [[1], [0, 4, 0, 1], [LONG, 7]], [False]),
}
CASES = [(name, lengths, masked) for name, (_, _, all_lengths, maskings) in LOSSES.items()
         for lengths in all_lengths for masked in maskings]


def make_inputs(lengths, dtype, masked):
    """Random log-probs and the other inputs; every non-empty segment gets at least one selected token."""
    n = sum(lengths)
    mask = None
    if masked:
        mask = torch.rand(n) < 0.4
        start = 0
        for length in lengths:
            if length:
                mask[start + int(torch.randint(length, ()))] = True
            start += length
    logps = (-5 * torch.rand(n)).to(dtype).requires_grad_()
    inputs = dict(mask=mask, ref_logps=-5 * torch.rand(n), weights=torch.rand(n))
    return logps, inputs, cu_seqlens(lengths)


def check_against_reference(name, lengths, masked, dtype, backend):
    call, ref, _, _ = LOSSES[name]
    logps, x, cu = make_inputs(lengths, dtype, masked)
    loss, metrics = call(logps, x, cu, backend)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dim() == 0 and loss.dtype == out_dtype
    (grad,) = torch.autograd.grad(loss, logps)
    assert grad.dtype == dtype

    lp = logps.detach().double().requires_grad_()
    want = ref(lp, x, lengths)
    (want_grad,) = torch.autograd.grad(want[0], lp)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(loss.double(), want[0].detach(), **tol)
    grad_rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-7 if dtype != torch.float64 else 1e-12, rtol=grad_rtol)

    assert all(not m.requires_grad and m.dtype == out_dtype for m in metrics.values())
    if name == "weighted_nll":
        torch.testing.assert_close(metrics["nll"].double(), want[1].detach(), **tol)
        return
    chosen, rejected = want[1].detach(), want[2].detach()
    torch.testing.assert_close(metrics["chosen_reward"].double(), chosen, **tol)
    torch.testing.assert_close(metrics["rejected_reward"].double(), rejected, **tol)
    torch.testing.assert_close(metrics["margin"].double(), chosen - rejected, **tol)
    assert torch.equal(metrics["accuracy"], (metrics["chosen_reward"] > metrics["rejected_reward"]).to(out_dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, lengths, masked", CASES, ids=str)
def test_matches_reference(name, lengths, masked, backend):
    check_against_reference(name, lengths, masked, torch.float32, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", LOSSES)
def test_bfloat16_logps(name, backend):
    check_against_reference(name, [5, 3, 1, 4], True if name == "sepo" else False, torch.bfloat16, backend)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("name", LOSSES)
def test_float64_logps(name, backend):
    check_against_reference(name, [5, 3, 1, 4], name == "sepo", torch.float64, backend)


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_torch(name):
    """Gradients w.r.t. logps and the other float input (ref_logps or weights; the reference-free losses
    must give it none)."""
    call = LOSSES[name][0]
    logps, x, cu = make_inputs([3, 1, 2, 4], torch.float64, masked=True)
    key = "weights" if name == "weighted_nll" else "ref_logps"
    other = x[key].double().requires_grad_()
    assert torch.autograd.gradcheck(lambda lp, o: call(lp, {**x, key: o}, cu, "torch")[0],
                                    (logps.detach().requires_grad_(), other))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("where", ["selected", "unselected"])
def test_nan_logps_give_nan_loss(name, backend, where):
    """NaN anywhere in logps means a broken model: the loss says so, even when the mask drops that token."""
    call = LOSSES[name][0]
    logps, x, cu = make_inputs([3, 2, 2, 3], torch.float32, masked=True)
    x["mask"][5] = where == "selected"  # token 5 is the first of segment 2: the rejected response of pair 0
    x["mask"][6] = True
    logps = logps.detach().clone()
    logps[5] = float("nan")
    loss, metrics = call(logps, x, cu, backend)
    assert torch.isnan(loss)
    if name != "weighted_nll":
        assert torch.isnan(metrics["margin"][0]) and not torch.isnan(metrics["margin"][1])
        assert metrics["accuracy"][0] == 0


# ---- properties ----

@st.composite
def pairs(draw, min_len=1):
    """(logps float64 [N], lengths of 2P segments) with P in [1, 4] and segment lengths in [min_len, 6]."""
    num_pairs = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(min_len, 6), min_size=2 * num_pairs, max_size=2 * num_pairs))
    values = draw(st.lists(st.floats(-30, 0), min_size=sum(lengths), max_size=sum(lengths)))
    return torch.tensor(values, dtype=torch.float64), lengths


def swap(x, lengths):
    """The same pairs with chosen and rejected exchanged."""
    p = len(lengths) // 2
    parts = split(x, lengths)
    return torch.cat(parts[p:] + parts[:p]), lengths[p:] + lengths[:p]


@settings(max_examples=40, deadline=None)
@given(pairs(), st.floats(0.01, 3))
def test_dpo_properties(data, beta):
    logps, lengths = data
    cu = cu_seqlens(lengths)
    ref_logps = torch.rand(logps.shape[0], dtype=torch.float64) * -10
    loss, m = dpo_loss(logps, ref_logps, cu, beta=beta, backend="torch")
    assert loss >= 0
    torch.testing.assert_close(loss, -F.logsigmoid(m["margin"]).mean())
    # Swapping chosen and rejected negates the margin; softplus(-m) - softplus(m) = -m.
    swapped, sw_lengths = swap(logps, lengths)
    loss_sw, m_sw = dpo_loss(swapped, swap(ref_logps, lengths)[0], cu_seqlens(sw_lengths), beta=beta, backend="torch")
    torch.testing.assert_close(m_sw["margin"], -m["margin"])
    torch.testing.assert_close(loss - loss_sw, -m["margin"].mean())
    # A policy equal to its reference: every reward 0, loss log 2, no pair counted as right.
    loss_eq, m_eq = dpo_loss(logps, logps, cu, beta=beta, backend="torch")
    assert loss_eq.item() == pytest.approx(math.log(2), abs=1e-12)
    assert not m_eq["margin"].any() and not m_eq["accuracy"].any()


@settings(max_examples=40, deadline=None)
@given(pairs(), st.floats(0.1, 3), st.floats(-20, 20))
def test_sepo_properties(data, gamma, shift):
    logps, lengths = data
    cu = cu_seqlens(lengths)
    mask = torch.ones(logps.shape[0], dtype=torch.bool)
    loss, m = sepo_loss(logps, mask, cu, gamma=gamma, backend="torch")
    assert loss >= 0
    swapped, sw_lengths = swap(logps, lengths)
    loss_sw, m_sw = sepo_loss(swapped, mask, cu_seqlens(sw_lengths), gamma=gamma, backend="torch")
    torch.testing.assert_close(m_sw["margin"], -m["margin"])
    torch.testing.assert_close(loss - loss_sw, -m["margin"].mean())
    # Means of log-probs: a common shift of every token moves both rewards alike, the loss not at all.
    loss_shift, _ = sepo_loss(logps + shift, mask, cu, gamma=gamma, backend="torch")
    torch.testing.assert_close(loss_shift, loss)
    # With every token selected, SePO is SimPO with beta = gamma and target margin gamma_simpo = margin.
    loss_simpo, _ = simpo_loss(logps, cu, beta=gamma, gamma=0.0, backend="torch")
    torch.testing.assert_close(loss_simpo, loss)


@settings(max_examples=40, deadline=None)
@given(pairs(), st.floats(0.1, 3), st.floats(-2, 2))
def test_simpo_properties(data, beta, gamma):
    logps, lengths = data
    loss, m = simpo_loss(logps, cu_seqlens(lengths), beta=beta, gamma=gamma, backend="torch")
    assert loss >= 0
    torch.testing.assert_close(loss, -F.logsigmoid(m["margin"] - gamma).mean())
    # Repeating each response's tokens keeps every mean, hence the loss.
    doubled = torch.cat([torch.cat([s, s]) for s in split(logps, lengths)])
    loss_2, _ = simpo_loss(doubled, cu_seqlens([2 * n for n in lengths]), beta=beta, gamma=gamma, backend="torch")
    torch.testing.assert_close(loss_2, loss)


@settings(max_examples=40, deadline=None)
@given(pairs(min_len=0))
def test_weighted_nll_properties(data):
    logps, lengths = data
    cu = cu_seqlens(lengths)
    weights = torch.rand(logps.shape[0], dtype=torch.float64)
    loss, m = weighted_nll(logps, weights, cu, backend="torch")
    assert loss >= 0 and (m["nll"] >= 0).all()  # log-probs <= 0, weights >= 0
    # Unit weights: the plain per-sequence negative log-likelihood.
    _, m_1 = weighted_nll(logps, torch.ones_like(weights), cu, backend="torch")
    torch.testing.assert_close(m_1["nll"], -torch.stack([s.sum() for s in split(logps, lengths)]))


# ---- bad input ----

BAD = [
    # (call, error, match)
    (lambda: sepo_loss(torch.zeros(0), torch.zeros(0, dtype=torch.bool), cu_seqlens([])), ValueError,
     "cu_seqlens holds no segment"),
    (lambda: dpo_loss(torch.zeros(3), torch.zeros(3), cu_seqlens([1, 1, 1])), ValueError, "even number of segments"),
    (lambda: simpo_loss(torch.zeros(3), cu_seqlens([1, 1, 1])), ValueError, "even number of segments"),
    (lambda: weighted_nll(torch.zeros(0), torch.zeros(0), cu_seqlens([])), ValueError, "cu_seqlens holds no segment"),
    (lambda: sepo_loss(torch.zeros(4), torch.tensor([1, 0, 1, 1], dtype=torch.bool), cu_seqlens([1, 1, 1, 1])),
     ValueError, r"mask selects no token of segment 1 \(chosen response of pair 1\)"),
    (lambda: sepo_loss(torch.zeros(3), torch.ones(3, dtype=torch.bool), cu_seqlens([1, 1, 1, 0])),
     ValueError, r"cu_seqlens: segment 3 \(rejected response of pair 1\) is empty"),
    (lambda: simpo_loss(torch.zeros(3), cu_seqlens([1, 0, 1, 1])), ValueError, "cu_seqlens: segment 1 .* is empty"),
    (lambda: simpo_loss(torch.zeros(4), cu_seqlens([2, 2]), mask=torch.tensor([1, 1, 0, 0], dtype=torch.bool)),
     ValueError, "mask selects no token of segment 1"),
    (lambda: sepo_loss(torch.zeros(4), torch.ones(4), cu_seqlens([2, 2])), TypeError, "mask must be a bool tensor"),
    (lambda: sepo_loss(torch.zeros(4), None, cu_seqlens([2, 2])), TypeError, "mask must be a torch.Tensor .*got None"),
    (lambda: dpo_loss(torch.zeros(4), torch.zeros(4), cu_seqlens([2, 2]), mask=torch.ones(3, dtype=torch.bool)),
     ValueError, r"mask must have shape \[N\] = \[4\]"),
    (lambda: dpo_loss(torch.zeros(4), torch.zeros(5), cu_seqlens([2, 2])), ValueError, r"ref_logps must have shape"),
    (lambda: dpo_loss(torch.zeros(4), torch.zeros(4, dtype=torch.int64), cu_seqlens([2, 2])), TypeError,
     "ref_logps must be float32"),
    (lambda: weighted_nll(torch.zeros(4), torch.ones(4, dtype=torch.bool), cu_seqlens([4])), TypeError,
     "weights must be float32"),
    (lambda: simpo_loss(torch.zeros(4, dtype=torch.int32), cu_seqlens([2, 2])), TypeError, "logps must be float32"),
    (lambda: simpo_loss(torch.zeros(4, 1), cu_seqlens([2, 2])), ValueError, "logps must have 1 dimension"),
    (lambda: simpo_loss([0.0, 0.0], cu_seqlens([1, 1])), TypeError, "logps must be a torch.Tensor"),
    (lambda: simpo_loss(torch.zeros(4), cu_seqlens([2, 1])), ValueError, "cu_seqlens must end at N=4"),
    (lambda: simpo_loss(torch.zeros(4), torch.tensor([0, 2, 4])), TypeError, "cu_seqlens must be int32"),
    (lambda: simpo_loss(torch.zeros(4), cu_seqlens([2, 2]), mask=torch.ones(4, dtype=torch.bool, device="meta")),
     ValueError, "mask is on meta"),
    (lambda: dpo_loss(torch.zeros(4), torch.zeros(4), cu_seqlens([2, 2]), beta=0.0), ValueError, "beta must be > 0"),
    (lambda: simpo_loss(torch.zeros(4), cu_seqlens([2, 2]), beta=-1), ValueError, "beta must be > 0"),
    (lambda: simpo_loss(torch.zeros(4), cu_seqlens([2, 2]), gamma=float("nan")), ValueError, "gamma must be finite"),
    (lambda: sepo_loss(torch.zeros(4), torch.ones(4, dtype=torch.bool), cu_seqlens([2, 2]), margin=float("inf")),
     ValueError, "margin must be finite"),
    (lambda: sepo_loss(torch.zeros(4), torch.ones(4, dtype=torch.bool), cu_seqlens([2, 2]), gamma="1"),
     TypeError, "gamma must be a real number"),
    (lambda: sepo_loss(torch.zeros(4), torch.ones(4, dtype=torch.bool), cu_seqlens([2, 2]), backend="gpu"),
     ValueError, "backend must be one of"),
    (lambda: dpo_loss(torch.zeros(4, dtype=torch.float64), torch.zeros(4), cu_seqlens([2, 2]), backend="triton"),
     TypeError, "logps: the triton backend takes"),
]


@pytest.mark.parametrize("call, error, match", BAD, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("loss", ["sepo", "simpo"])
def test_empty_selection_raises_before_any_sum(loss, monkeypatch):
    """The check comes before the work: no segment sum is started for a batch that will be refused."""
    def refuse(*args, **kwargs):
        raise AssertionError("segment_sum ran before the inputs were checked")

    monkeypatch.setattr(common, "segment_sum_unchecked", refuse)
    logps, mask, cu = torch.zeros(4), torch.tensor([1, 1, 1, 0], dtype=torch.bool), cu_seqlens([1, 1, 1, 1])
    with pytest.raises(ValueError, match="mask selects no token of segment 3"):
        sepo_loss(logps, mask, cu) if loss == "sepo" else simpo_loss(logps, cu, mask=mask)


@pytest.mark.parametrize("name, function", [("sepo", sepo_loss), ("dpo", dpo_loss), ("simpo", simpo_loss),
                                            ("weighted_nll", weighted_nll)])
def test_registered_options_are_the_functions(name, function):
    """The registered loss takes the public function's options, with its defaults: linear_selective_loss and the
    loss function agree on what an option left out means."""
    params = inspect.signature(function).parameters
    options = {k: p.default for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k not in ("mask", "backend")}
    assert {k: o.default for k, o in spec.LOSSES[name].options.items()} == options
