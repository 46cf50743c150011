"""The body's token layout in the stages (issue 21): `data.packing` reaches every stage that runs a body, a whole
run gives the same results under shared and padded, a model that cannot take the layout runs padded and says so,
and each stage reports the tokens its bodies computed (selpo.context, selpo.body, selpo.packing_check)."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from selpo.batches import Example, collate
from selpo.body import layout_of
from selpo.context import Context
from selpo.data import TokenizedPair, TokenizedRanking
from selpo.reward_model import load_reward_model, token_rewards
from selpo.testing import tiny_model_dir
from selpo.trainer import make_accelerator

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import selpo, tiny_settings  # noqa: E402
from test_head_conformance import ARCHITECTURES, build  # noqa: E402
from tiny_data import write_pairs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BODY_STAGES = {"sepo": ("oracle", "score", "train", "eval"), "guidance": ("guidance", "train", "eval")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(root, {(method, packing): run folder}) of SePO and guidance runs under shared and padded."""
    root = tmp_path_factory.mktemp("layouts")
    settings = tiny_settings(tiny_model_dir(root), write_pairs(root / "train.jsonl", 24),
                             write_pairs(root / "test.jsonl", 6, seed=1))
    done = {}
    for method in BODY_STAGES:
        for packing in ("shared", "padded"):
            run_dir = root / f"{method}-{packing}"
            code, _, err = selpo("run", "--run-dir", run_dir, *settings, "--set", f"method={method}",
                                 "--set", f"data.packing={packing}")
            assert code == 0, err[-3000:]
            done[method, packing] = run_dir
    return root, done


def _numbers(value, prefix=""):
    """Every number in a JSON value, by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{prefix}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{prefix}[{i}]").items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


def _metrics(run_dir: Path, stage: str) -> dict:
    lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
    return _numbers([{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines])


@pytest.mark.parametrize("method", list(BODY_STAGES))
def test_a_run_gives_the_same_results_under_shared_and_padded(runs, method):
    _, done = runs
    shared, padded = done[method, "shared"], done[method, "padded"]
    trained = [s for s in BODY_STAGES[method] if (padded / s / "metrics.jsonl").is_file()]
    assert "train" in trained
    for stage in trained:
        got, want = _metrics(shared, stage), _metrics(padded, stage)
        assert got.keys() == want.keys()
        for key in want:
            assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-5), (stage, key, got[key], want[key])
    got, want = (_numbers(json.loads((d / "eval" / "results.json").read_text())) for d in (shared, padded))
    assert got.keys() == want.keys() and len(want) > 10
    for key in want:
        assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-5), (key, got[key], want[key])
    if method == "sepo":
        masks = [[(r["chosen_mask"], r["rejected_mask"]) for r in map(json.loads, open(d / "score" / "scored.jsonl"))]
                 for d in (shared, padded)]
        assert masks[0] == masks[1]


@pytest.mark.parametrize("method", list(BODY_STAGES))
def test_each_stage_reports_the_tokens_its_bodies_computed(runs, method):
    _, done = runs
    for stage in BODY_STAGES[method]:
        summaries = {p: json.loads((done[method, p] / stage / "DONE.json").read_text())["summary"]
                     for p in ("shared", "padded")}
        shared, padded = summaries["shared"], summaries["padded"]
        assert padded["body_tokens"] == padded["padded_tokens"] > 0, stage
        assert shared["padded_tokens"] == padded["padded_tokens"], stage  # the same batches
        assert shared["body_tokens"] < shared["padded_tokens"], stage  # each prompt once, no padding
        assert (shared["body_layouts"], padded["body_layouts"]) == (["shared"], ["padded"]), stage
    report = (done[method, "shared"] / "report.html").read_text()
    assert "Model body work" in report and "data.packing =\nshared" in report


def test_the_packing_key_is_in_no_fingerprint(runs):
    _, done = runs
    code, out, err = selpo("run", "--run-dir", done["sepo", "shared"], "--set", "data.packing=packed")
    assert code == 0, err[-2000:]
    assert out.count("done, skipped") == 6


def test_a_model_that_cannot_take_the_layout_runs_padded_and_says_so(tmp_path, capsys):
    config_args = [f"run_dir={tmp_path}", "data.packing=shared"]
    from selpo import config as config_module

    ctx = Context(config_module.load(None, config_args), make_accelerator(config_module.load(None, config_args)))
    recurrent = build(next(a for a in ARCHITECTURES if a.name == "RecurrentGemma"))
    ctx._choose_layout(recurrent, "recurrent")
    assert layout_of(recurrent) == "padded"
    assert "data.packing: recurrent runs the padded layout instead of shared: " in capsys.readouterr().out
    llama = build(next(a for a in ARCHITECTURES if a.name == "Llama"))
    ctx._choose_layout(llama, "llama")
    assert layout_of(llama) == "shared" and capsys.readouterr().out == ""


def test_token_rewards_are_the_same_in_every_layout(tmp_path):
    model, _ = load_reward_model(tiny_model_dir(tmp_path))
    model.eval()
    generator = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 200, (n,), generator=generator).tolist()

    items = [TokenizedRanking(ids(p), [ids(a), ids(b), ids(c)], row=i)
             for i, (p, a, b, c) in enumerate([(5, 3, 7, 1), (2, 6, 2, 4)])]
    pairs = [TokenizedPair(ids(4), ids(3), ids(5), row=0), TokenizedPair(ids(6), ids(1), ids(2), row=1)]
    for group in (items, pairs):
        padded = token_rewards(model, collate([Example(x) for x in group], 0).pairs)
        for layout in ("shared", "packed"):
            got = token_rewards(model, collate([Example(x) for x in group], 0, layout).pairs)
            torch.testing.assert_close(got, padded, rtol=0, atol=1e-6)
