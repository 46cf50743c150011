"""token_scores against the difference of two float64 log-softmaxes."""

import pytest
import torch
from conftest import BACKENDS
from helpers import TOL

from selpo.kernels import token_scores


def reference(ha, wa, hb, wb, targets):
    def logp(h, w):
        lp = torch.log_softmax(h.double() @ w.double().T, dim=-1)
        return lp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets == -100, 0.0, logp(ha, wa) - logp(hb, wb))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, da, db, v", [(0, 4, 4, 3), (1, 6, 9, 130), (41, 70, 33, 257)])
def test_matches_reference(backend, dtype, n, da, db, v):
    ha, hb = torch.randn(n, da).to(dtype), torch.randn(n, db).to(dtype)
    wa, wb = (torch.randn(v, da) * 0.3).to(dtype), (torch.randn(v, db) * 0.3).to(dtype)
    targets = torch.randint(0, v, (n,))
    if n > 2:
        targets[1::5] = -100
    got = token_scores(ha, wa, hb, wb, targets, backend=backend)
    want = reference(ha, wa, hb, wb, targets)
    assert got.dtype == torch.float32 and got.shape == (n,) and not got.requires_grad
    if n:
        assert (got.double() - want).abs().max().item() <= 2 * TOL[dtype] * max(1.0, want.abs().max().item())
    assert torch.all(got[targets == -100] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_model_scores_zero_and_nan_propagates(backend):
    h, w = torch.randn(7, 12), torch.randn(50, 12)
    targets = torch.randint(0, 50, (7,))
    assert torch.all(token_scores(h, w, h, w, targets, backend=backend) == 0)
    h2 = h.clone()
    h2[3, 0] = float("nan")
    out = token_scores(h2, w, h, w, targets, backend=backend)
    assert torch.isnan(out[3]) and torch.isfinite(out[[0, 1, 2, 4, 5, 6]]).all()


@pytest.mark.parametrize("change, match", [
    ({"hb": torch.zeros(4, 5)}, "hidden_b must have N=3"),
    ({"wb": torch.zeros(9, 5)}, "weight_b must have the vocabulary size"),
    ({"wa": torch.zeros(8, 3)}, "weight_a must have shape"),
    ({"hb": torch.zeros(3, 5, dtype=torch.float16), "wb": torch.zeros(8, 5, dtype=torch.float16)}, "has dtype"),
    ({"targets": torch.tensor([0, 8, 1])}, "targets must lie in"),
])
def test_bad_input(change, match):
    args = {"ha": torch.zeros(3, 4), "wa": torch.zeros(8, 4), "hb": torch.zeros(3, 5), "wb": torch.zeros(8, 5),
            "targets": torch.tensor([0, 7, 1])}
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        token_scores(args["ha"], args["wa"], args["hb"], args["wb"], args["targets"])
