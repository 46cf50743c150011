"""SePO's released rule counts k as the authors' Python does, ``int(float(ratio) * n)`` over the n = length - 1
selectable tokens: for a few (ratio, n) the float product lands just below an integer and k is one less than
the exact floor, which selpo's "paper" rule keeps."""

import pytest
import torch

from selpo.stages.score import released_counts, select

BACKENDS = ["naive", "torch", "triton"]
PERCENTS = range(1, 101)  # ratios 0.01 .. 1.00, as a config gives them
SELECTABLE = range(1, 521)
# (ratio, n) where the released int(ratio * n) differs from the exact floor(p * n / 100).
DIFFERING = [(p / 100, n) for p in PERCENTS for n in SELECTABLE if int(p / 100 * n) != p * n // 100]


def lengths_cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_the_two_arithmetics_differ_on_a_few_pairs():
    assert (0.58, 50) in DIFFERING and int(0.58 * 50) == 28  # a 51-token response: 28, not the exact 29
    assert 0 < len(DIFFERING) < 100
    assert all(int(ratio * n) == round(ratio * 100) * n // 100 - 1 for ratio, n in DIFFERING)


def test_released_counts_are_the_released_arithmetic_on_every_pair():
    lengths = [n + 1 for n in SELECTABLE] + [1, 0]  # a one-token response keeps its token; nothing has nothing
    for p in PERCENTS:
        want = [max(1, int(p / 100 * n)) for n in SELECTABLE] + [1, 0]
        assert released_counts(lengths_cu(lengths), p / 100).tolist() == want, p


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_released_keeps_the_released_k_where_the_arithmetics_differ(backend):
    by_ratio = {}
    for ratio, n in DIFFERING:
        by_ratio.setdefault(ratio, []).append(n)
    for ratio, ns in by_ratio.items():
        # One pair per n, chosen and rejected both n + 1 tokens long.
        lengths = [n + 1 for n in ns] * 2
        cu = lengths_cu(lengths)
        scores = torch.randn(int(cu[-1]), dtype=torch.float64)
        mask = select(scores, cu, ratio, ratio, backend=backend, rule="released")
        parts = mask.split(lengths)
        assert [int(part.sum()) for part in parts] == [max(1, int(ratio * n)) for n in ns] * 2, ratio
        assert not any(part[0] for part in parts)  # the first token is never selectable
        paper = select(scores, cu, ratio, ratio, backend=backend, rule="paper").split(lengths)
        assert [int(part.sum()) for part in paper] == [max(1, round(ratio * 100) * (n + 1) // 100) for n in ns] * 2
