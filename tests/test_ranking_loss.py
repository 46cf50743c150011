"""Token-level guidance's reward side: sequence_scores, mean_lengths and plackett_luce_loss against float64
formulas written out here per segment and per group, hand-computed examples, gradients and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cu_seqlens

from selpo.kernels.losses import common, mean_lengths, plackett_luce_loss, ranking, sequence_scores

BACKENDS = ["naive", "torch", "triton"]
AGGREGATIONS = ["avg", "softmax", "softmin", "sum"]
LONG = 1100  # longer than one Triton block (1024), not a multiple of it
LENGTHS = [[1, 3, 5, 7, 1, 9], [LONG, 1, 1031, 3]]  # odd lengths, length 1; S = 2G
TEMPERATURE = 0.7


# ---- float64 references: the paper's formulas, one segment (or group) at a time ----

def ref_scores(rewards, lengths, aggregation, temperature, scale):
    """[S] scores of float64 ``rewards``; differentiable by autograd for the gradient comparison."""
    out = []
    for s, r in enumerate(torch.split(rewards, lengths)):
        c = 1.0 if scale is None else scale[s].double()
        if aggregation == "avg":
            out.append(c * r.sum() / len(r))
        elif aggregation == "softmax":
            out.append(c * temperature * torch.log(torch.exp(r / temperature).sum()))
        elif aggregation == "softmin":
            out.append(-c * temperature * torch.log(torch.exp(-r / temperature).sum()))
        else:
            out.append(r.sum())  # no scale: "sum" ignores it
    return torch.stack(out)


def ref_plackett_luce(scores, num_groups):
    """(loss, metrics) as Python floats: per group, -sum_k log(exp(e_k) / sum_{j>=k} exp(e_j))."""
    k = len(scores) // num_groups
    losses, metrics = [], {"chosen_reward": [], "rejected_reward": [], "margin": [], "accuracy": []}
    for g in range(num_groups):
        e = [float(scores[i * num_groups + g]) for i in range(k)]
        losses.append(-sum(math.log(math.exp(e[i]) / sum(math.exp(x) for x in e[i:])) for i in range(k - 1)))
        metrics["chosen_reward"].append(e[0])
        metrics["rejected_reward"].append(e[-1])
        metrics["margin"].append(e[0] - e[1])
        metrics["accuracy"].append(float(all(e[0] > x for x in e[1:])))
    return sum(losses) / num_groups, metrics


def random_rewards(n, dtype):
    """Token rewards in (0, 1], as the paper's reward model gives them."""
    return (1 - torch.rand(n, dtype=torch.float64)).to(dtype)


# ---- sequence_scores ----

def check_scores(lengths, aggregation, scaled, dtype, backend):
    cu = cu_seqlens(lengths)
    rewards = random_rewards(sum(lengths), dtype).requires_grad_()
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = mean_lengths(cu, len(lengths) // 2).to(out_dtype).requires_grad_() if scaled else None
    got = sequence_scores(rewards, cu, aggregation=aggregation, temperature=TEMPERATURE, scale=scale,
                          backend=backend)
    assert got.shape == (len(lengths),) and got.dtype == out_dtype
    weights = torch.randn(len(lengths), dtype=torch.float64)
    grads = torch.autograd.grad((got * weights.to(out_dtype)).sum(), [rewards] + ([scale] if scaled else []),
                                allow_unused=True)

    r = rewards.detach().double().requires_grad_()
    c = scale.detach().double().requires_grad_() if scaled else None
    want = ref_scores(r, lengths, aggregation, TEMPERATURE, c if aggregation != "sum" else None)
    want_grads = torch.autograd.grad((want * weights).sum(), [r] + ([c] if scaled else []), allow_unused=True)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.detach().double(), want.detach(), **tol)
    assert grads[0].dtype == dtype
    grad_tol = dict(atol=1e-7, rtol=8e-3) if dtype == torch.bfloat16 else tol  # bf16 grads are rounded to bf16
    torch.testing.assert_close(grads[0].double(), want_grads[0], **grad_tol)
    if scaled:
        if aggregation == "sum":
            assert grads[1] is None or not grads[1].any()
        else:
            torch.testing.assert_close(grads[1].double(), want_grads[1], **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=["short", "long"])
@pytest.mark.parametrize("scaled", [False, True], ids=["C=1", "C=mean_lengths"])
def test_scores_match_reference(lengths, aggregation, scaled, backend):
    check_scores(lengths, aggregation, scaled, torch.float32, backend)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_scores_float64(aggregation, backend):
    check_scores(LENGTHS[0], aggregation, True, torch.float64, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_scores_bfloat16(aggregation, backend):
    check_scores(LENGTHS[0], aggregation, True, torch.bfloat16, backend)


# Rewards [0.5, 1.0] and [0.25], temperature 2; a single token scores itself under every aggregation.
HAND = {
    "avg": [0.75, 0.25],
    "softmax": [2 * math.log(math.exp(0.25) + math.exp(0.5)), 0.25],
    "softmin": [-2 * math.log(math.exp(-0.25) + math.exp(-0.5)), 0.25],
    "sum": [1.5, 0.25],
}
# Both segments in one group: C = (2 + 1) / 2 = 1.5 for each ("sum" ignores it).
HAND_SCALED = {
    "avg": [1.125, 0.375],
    "softmax": [3 * math.log(math.exp(0.25) + math.exp(0.5)), 0.375],
    "softmin": [-3 * math.log(math.exp(-0.25) + math.exp(-0.5)), 0.375],
    "sum": [1.5, 0.25],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_scores_hand_example(aggregation, backend):
    rewards, cu = torch.tensor([0.5, 1.0, 0.25]), cu_seqlens([2, 1])
    scale = mean_lengths(cu, 1)
    assert scale.tolist() == [1.5, 1.5]
    for c, want in ((None, HAND), (scale, HAND_SCALED)):
        got = sequence_scores(rewards, cu, aggregation=aggregation, temperature=2.0, scale=c, backend=backend)
        torch.testing.assert_close(got.double(), torch.tensor(want[aggregation], dtype=torch.float64),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["softmax", "softmin"])
@pytest.mark.parametrize("offset", [1000.0, -1000.0])
def test_soft_scores_do_not_overflow(aggregation, offset, backend):
    """At temperature 0.05, exp(1000 / 0.05) overflows: the per-segment shift keeps the score finite, and
    shifting every reward of a segment by b shifts its score by b."""
    lengths = [3, 1, 5, 2]
    rewards = (offset + random_rewards(11, torch.float64)).float()
    got = sequence_scores(rewards, cu_seqlens(lengths), aggregation=aggregation, temperature=0.05, backend=backend)
    want = ref_scores(rewards.double() - offset, lengths, aggregation, 0.05, None) + offset
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradcheck_scores(aggregation):
    cu = cu_seqlens([3, 1, 2, 4])
    rewards = random_rewards(10, torch.float64).requires_grad_()
    scale = mean_lengths(cu, 2).double().requires_grad_()

    def call(r, c):
        return sequence_scores(r, cu, aggregation=aggregation, temperature=TEMPERATURE, scale=c, backend="torch")

    if aggregation == "sum":
        assert torch.autograd.gradcheck(lambda r: call(r, scale), (rewards,))
        assert torch.equal(call(rewards, scale), call(rewards, None))
    else:
        assert torch.autograd.gradcheck(call, (rewards, scale))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_of_empty_segment_is_zero(backend):
    got = sequence_scores(torch.tensor([0.5, 0.25]), cu_seqlens([1, 0, 1]), aggregation="sum", backend=backend)
    assert got.tolist() == [0.5, 0.0, 0.25]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_nan_reward_gives_nan_score(aggregation, backend):
    """A NaN token reward, in a longer segment or alone in its own, makes that segment's score NaN, no other."""
    lengths = [2, 3, 1, 2]
    rewards = random_rewards(8, torch.float32)
    rewards[3] = rewards[5] = float("nan")  # the middle of segment 1; segment 2, a single token
    got = sequence_scores(rewards, cu_seqlens(lengths), aggregation=aggregation, temperature=TEMPERATURE,
                          scale=torch.full((4,), 2.0), backend=backend)
    assert torch.isnan(got[1]) and torch.isnan(got[2])
    want = ref_scores(rewards.double(), lengths, aggregation, TEMPERATURE, None if aggregation == "sum" else
                      torch.full((4,), 2.0))
    torch.testing.assert_close(got[[0, 3]].double(), want[[0, 3]], atol=2e-5, rtol=2e-5)


# ---- mean_lengths ----

def test_mean_lengths_hand_example():
    cu = cu_seqlens([2, 4, 5, 1])
    # Two groups of K = 2, rank-major: group 0 = segments 0 and 2, group 1 = segments 1 and 3.
    got = mean_lengths(cu, 2)
    assert got.dtype == torch.float32 and got.tolist() == [3.5, 2.5, 3.5, 2.5]
    assert mean_lengths(cu, 1).tolist() == [3.0] * 4
    assert mean_lengths(cu, 4).tolist() == [2.0, 4.0, 5.0, 1.0]
    assert mean_lengths(cu_seqlens([1, 2, 6]), 1).tolist() == [3.0, 3.0, 3.0]


# ---- plackett_luce_loss ----

@pytest.mark.parametrize("num_groups", [1, 5])
def test_plackett_luce_is_bradley_terry_at_two(num_groups):
    scores = 3 * torch.randn(2 * num_groups, dtype=torch.float64)
    loss, metrics = plackett_luce_loss(scores, num_groups)
    want = -F.logsigmoid(scores[:num_groups] - scores[num_groups:]).mean()
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=1e-12)
    _, pair_metrics = common.pair_loss(scores, 0.0)
    assert metrics.keys() == pair_metrics.keys()
    for name, value in pair_metrics.items():
        torch.testing.assert_close(metrics[name], value, atol=1e-12, rtol=1e-12)


def test_plackett_luce_hand_example():
    # K = 3, two groups, rank-major: group 0 scores (2, 1, 0), group 1 scores (0, 0, 0).
    scores = torch.tensor([2.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    loss, metrics = plackett_luce_loss(scores, 2)
    group_0 = (math.log(math.exp(2) + math.exp(1) + 1) - 2) + (math.log(math.exp(1) + 1) - 1)
    group_1 = math.log(3) + math.log(2)  # a uniform draw: 1/3, then 1/2
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((group_0 + group_1) / 2, abs=1e-5)
    assert metrics["accuracy"].tolist() == [1.0, 0.0]  # a tie is not a win
    assert metrics["margin"].tolist() == [1.0, 0.0]
    assert metrics["chosen_reward"].tolist() == [2.0, 0.0]
    assert metrics["rejected_reward"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_plackett_luce_matches_reference_at_four(dtype):
    num_groups = 6
    scores = (3 * torch.randn(4 * num_groups, dtype=torch.float64)).to(dtype)
    scores[3 * num_groups] = scores[0]  # group 0: best tied with the worst, not counted as right
    scores_in = scores.clone().requires_grad_()
    loss, metrics = plackett_luce_loss(scores_in, num_groups)
    want_loss, want = ref_plackett_luce(scores.double().tolist(), num_groups)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert loss.dtype == out_dtype and loss.item() == pytest.approx(want_loss, abs=tol, rel=tol)
    for name, values in want.items():
        assert not metrics[name].requires_grad and metrics[name].dtype == out_dtype
        torch.testing.assert_close(metrics[name].double(), torch.tensor(values, dtype=torch.float64),
                                   atol=tol, rtol=tol)
    assert metrics["accuracy"][0] == 0
    (grad,) = torch.autograd.grad(loss, scores_in)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    # The metrics are copies: changing the scores afterwards leaves them as they were.
    best = metrics["chosen_reward"].clone()
    with torch.no_grad():
        scores_in.add_(1)
    assert torch.equal(metrics["chosen_reward"], best)


def test_plackett_luce_large_scores():
    """Scores far beyond exp's range: the log-cumsum-exp keeps the loss exact."""
    loss, _ = plackett_luce_loss(torch.tensor([1000.0, -1000.0]), 1)
    assert loss.item() == 0.0
    loss, _ = plackett_luce_loss(torch.tensor([-1000.0, 1000.0]), 1)
    assert loss.item() == pytest.approx(2000.0)
    loss, _ = plackett_luce_loss(torch.tensor([3000.0, 2000.0, 1000.0]), 1)
    assert loss.item() == 0.0


def test_gradcheck_plackett_luce():
    scores = 2 * torch.randn(3 * 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: plackett_luce_loss(s, 4)[0], (scores.requires_grad_(),))


def test_gradcheck_scores_into_plackett_luce():
    """The reward model's whole objective: token rewards -> scaled soft-max scores -> ranking loss."""
    cu = cu_seqlens([3, 1, 2, 4, 1, 2])  # K = 3 ranked sequences of G = 2 groups
    scale = mean_lengths(cu, 2).double()
    rewards = random_rewards(13, torch.float64).requires_grad_()

    def objective(r):
        scores = sequence_scores(r, cu, aggregation="softmax", temperature=TEMPERATURE, scale=scale, backend="torch")
        return plackett_luce_loss(scores, 2)[0]

    assert torch.autograd.gradcheck(objective, (rewards,))


def test_nan_score_gives_nan_loss():
    scores = torch.tensor([2.0, 1.0, float("nan"), 0.0])
    loss, metrics = plackett_luce_loss(scores, 2)
    assert torch.isnan(loss)
    assert metrics["accuracy"].tolist() == [0.0, 1.0]


# ---- bad input ----

R, CU = torch.rand(4), cu_seqlens([2, 2])
BAD = [
    # (call, error, match)
    (lambda: sequence_scores(R, CU, aggregation="max"), ValueError, "aggregation must be one of"),
    (lambda: sequence_scores(R, CU, aggregation=None), ValueError, "aggregation must be one of"),
    (lambda: sequence_scores(R, CU, temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda: sequence_scores(R, CU, aggregation="softmax", temperature=-1), ValueError, "temperature must be > 0"),
    (lambda: sequence_scores(R, CU, temperature=float("inf")), ValueError, "temperature must be finite"),
    (lambda: sequence_scores(R, CU, temperature="2"), TypeError, "temperature must be a real number"),
    (lambda: sequence_scores(torch.rand(3), cu_seqlens([2, 0, 1])), ValueError,
     "cu_seqlens: segment 1 is empty; aggregation='avg' takes a mean"),
    (lambda: sequence_scores(torch.rand(3), cu_seqlens([2, 1, 0]), aggregation="softmin"), ValueError,
     "cu_seqlens: segment 2 is empty; aggregation='softmin' takes a log-sum-exp"),
    (lambda: sequence_scores(R, CU, scale=torch.ones(3)), ValueError, r"scale must have shape \[S\] = \[2\]"),
    (lambda: sequence_scores(R, CU, scale=torch.ones(2, dtype=torch.int64)), TypeError, "scale must be float32"),
    (lambda: sequence_scores(R, CU, scale=torch.ones(2, device="meta")), ValueError, "scale is on meta"),
    (lambda: sequence_scores(torch.ones(4, dtype=torch.int32), CU), TypeError, "rewards must be float32"),
    (lambda: sequence_scores(R, cu_seqlens([2, 1])), ValueError, "cu_seqlens must end at N=4"),
    (lambda: sequence_scores(R, CU, backend="gpu"), ValueError, "backend must be one of"),
    (lambda: sequence_scores(R.double(), CU, backend="triton"), TypeError, "rewards: the triton backend takes"),
    (lambda: plackett_luce_loss(torch.zeros(3), 3), ValueError,
     "scores must hold at least 2 ranked sequence.*num_groups=3, K=1"),
    (lambda: plackett_luce_loss(torch.zeros(0), 1), ValueError, "scores must hold at least 2"),
    (lambda: plackett_luce_loss(torch.zeros(5), 2), ValueError, "num_groups=2 must divide the S=5 sequences of scores"),
    (lambda: plackett_luce_loss(torch.zeros(4), 0), ValueError, "num_groups must be >= 1"),
    (lambda: plackett_luce_loss(torch.zeros(4), 2.0), TypeError, "num_groups must be an int"),
    (lambda: plackett_luce_loss(torch.zeros(4), True), TypeError, "num_groups must be an int"),
    (lambda: plackett_luce_loss(torch.zeros(2, 2), 1), ValueError, "scores must have 1 dimension"),
    (lambda: plackett_luce_loss(torch.zeros(4, dtype=torch.int64), 2), TypeError, "scores must be float32"),
    (lambda: mean_lengths(cu_seqlens([1, 2, 3]), 2), ValueError,
     "num_groups=2 must divide the S=3 sequences of cu_seqlens"),
    (lambda: mean_lengths(cu_seqlens([]), 1), ValueError, "cu_seqlens must hold at least 1"),
    (lambda: mean_lengths(torch.tensor([0, 2, 4]), 2), TypeError, "cu_seqlens must be int32"),
    (lambda: mean_lengths(torch.tensor([1, 2, 4], dtype=torch.int32), 2), ValueError, "cu_seqlens must start at 0"),
    (lambda: mean_lengths(torch.tensor([0, 3, 2], dtype=torch.int32), 2), ValueError, "non-decreasing"),
    (lambda: mean_lengths(torch.zeros(0, dtype=torch.int32), 1), ValueError, r"cu_seqlens must have shape \[S\+1\]"),
    (lambda: mean_lengths([0, 2, 4], 2), TypeError, "cu_seqlens must be a torch.Tensor"),
    (lambda: mean_lengths(CU, "2"), TypeError, "num_groups must be an int"),
]


@pytest.mark.parametrize("call, error, match", BAD, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("aggregation", ["avg", "softmax"])
def test_empty_segment_raises_before_any_sum(aggregation, monkeypatch):
    """The check comes before the work: no segment sum is started for a batch that will be refused."""
    def refuse(*args, **kwargs):
        raise AssertionError("segment_sum ran before the inputs were checked")

    monkeypatch.setattr(common, "segment_sum_unchecked", refuse)
    monkeypatch.setattr(ranking, "segment_sum_unchecked", refuse)
    with pytest.raises(ValueError, match="cu_seqlens: segment 3 is empty"):
        sequence_scores(torch.rand(3), cu_seqlens([1, 1, 1, 0]), aggregation=aggregation)
