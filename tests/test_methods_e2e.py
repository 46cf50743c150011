"""Selective-DPO, token-level guidance, DPO and SimPO end to end through `selpo run`, and `selpo compare`,
on a tiny random Llama (selpo.stages, selpo.compare)."""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from selpo import config as config_module
from selpo.batches import Example
from selpo.compare import load_config, parse_grid
from selpo.context import DONE, Context
from selpo.methods.guidance import Alternation
from selpo.stages.pipeline import fingerprint, pipeline
from selpo.testing import tiny_model_dir
from selpo.trainer import make_accelerator

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import selpo, tiny_settings  # noqa: E402
from tiny_data import write_pairs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OTHERS = ("selective_dpo", "guidance", "dpo", "simpo")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods_e2e")
    train = write_pairs(root / "train.jsonl", 24)
    return root, tiny_settings(tiny_model_dir(root), train, write_pairs(root / "test.jsonl", 6, seed=1))


@pytest.fixture(scope="module")
def runs(tiny):
    """Each method run once: method -> (run folder, printed output)."""
    root, settings = tiny
    done = {}
    for method in OTHERS:
        run_dir = root / method
        code, out, err = selpo("run", "--run-dir", run_dir, *settings, "--set", f"method={method}")
        assert code == 0, f"{method}: {err[-3000:]}"
        done[method] = (run_dir, out)
    return done


@pytest.mark.parametrize("method", OTHERS)
def test_each_method_runs_its_stages_and_reports(runs, method):
    run_dir, out = runs[method]
    for stage in pipeline(method):
        assert (run_dir / stage / DONE).is_file(), stage
    for stage in {"oracle", "guidance", "score"} - set(pipeline(method)):
        assert not (run_dir / stage).exists(), stage
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["method"] == method
    assert -1 <= results["policy"]["reward"] <= 1 and results["policy"]["kl"] != 0
    assert ("oracle" in results) == (method == "selective_dpo")
    assert ("selection" in results) == (method == "selective_dpo")
    views = [json.loads(line) for line in (run_dir / "eval" / "tokens.jsonl").read_text().splitlines()]
    assert len(views) == 5
    for view in views:
        for side in ("chosen", "rejected"):
            assert len(view[f"{side}_ids"]) == len(view[f"{side}_scores"]) == len(view[f"{side}_mask"])
    page = (run_dir / "report.html").read_text()
    assert page.count('<div class="pair">') == 3 and "reward (mean VADER compound of samples)" in out


def _token_share(run_dir):
    return json.loads((run_dir / "eval" / "results.json").read_text())["policy"]["token_share"]


def test_token_shares_follow_each_methods_selection(runs):
    assert _token_share(runs["dpo"][0]) == 1.0 and _token_share(runs["simpo"][0]) == 1.0
    assert _token_share(runs["guidance"][0]) == 1.0  # every token of the chosen responses, its only batch
    assert 0.25 < _token_share(runs["selective_dpo"][0]) <= 0.45  # max(1, floor(40%)) of short responses


def test_selective_dpo_view_keeps_the_top_scores_of_each_response(runs):
    run_dir = runs["selective_dpo"][0]
    for line in (run_dir / "eval" / "tokens.jsonl").read_text().splitlines():
        view = json.loads(line)
        for side in ("chosen", "rejected"):
            scores, mask = view[f"{side}_scores"], view[f"{side}_mask"]
            kept = [s for s, m in zip(scores, mask) if m]
            rest = [s for s, m in zip(scores, mask) if not m]
            assert len(kept) == max(1, int(0.4 * len(scores) + 1e-9))
            assert not rest or min(kept) >= max(rest)


def test_guidance_retrains_its_reward_model_on_ranked_samples(runs):
    run_dir = runs["guidance"][0]
    round_dir = run_dir / "train" / "rewards" / "round-1"  # every=2, 3 steps: one round, before step 2
    assert (round_dir / "DONE.json").is_file() and (round_dir / "model" / "config.json").is_file()
    assert not (run_dir / "train" / "rewards" / "round-2").exists()
    assert json.loads((round_dir / "DONE.json").read_text())["rankings"] == 4
    summary = json.loads((run_dir / "train" / DONE).read_text())["summary"]
    assert summary["reward_model"] == str(round_dir / "model")
    for view in map(json.loads, (run_dir / "eval" / "tokens.jsonl").read_text().splitlines()):
        assert all(0 < r < 1 for r in view["chosen_scores"] + view["rejected_scores"])
        assert set(view["chosen_mask"]) == {1} and set(view["rejected_mask"]) == {0}


def test_guidance_round_is_reused_when_training_resumes(runs, monkeypatch):
    """A resumed training past a round loads that round's weights instead of sampling again."""
    import selpo.methods.guidance as guidance

    run_dir = runs["guidance"][0]
    config = config_module.load(run_dir / "config.toml")
    ctx = Context(config, make_accelerator(config))
    examples = [Example(p, {"weights": None}) for p in ctx.pairs("train")]
    monkeypatch.setattr(guidance, "sample_responses", lambda *a, **k: pytest.fail("sampled again"))
    hook = Alternation(ctx, None, examples, fingerprint(config, "train"))
    hook(1, policy=None)  # before round 1: nothing changes
    assert examples[0].extras["weights"] is None
    hook(2, policy=None)
    saved = torch.load(run_dir / "train" / "rewards" / "round-1" / "weights.pt")
    assert len(saved) == len(examples)
    for example, weights in zip(examples, saved):
        assert len(weights) == 1  # the chosen response alone
        torch.testing.assert_close(example.extras["weights"][0], weights[0])
        assert abs(float(weights[0].sum()) - 1) < 1e-5


def test_a_stage_outside_the_method_is_refused(tiny, tmp_path):
    _, settings = tiny
    code, _, err = selpo("score", "--run-dir", tmp_path / "r", *settings, "--set", "method=dpo")
    assert code == 1 and "stage 'score' is not part of method 'dpo', which runs data, train, eval, report" in err


def test_compare_runs_the_grid_shares_stages_and_reuses_finished_runs(tiny, tmp_path):
    _, settings = tiny
    args = ["compare", "--dir", tmp_path / "cmp", "--methods", "sepo,selective_dpo,dpo",
            "--grid", "dpo=dpo.beta:0.1,0.5", "--grid", "sepo=sepo.gamma:1",
            "--grid", "selective_dpo=selective_dpo.beta:0.1", *settings]
    code, out, err = selpo(*args)
    assert code == 0, err[-3000:]
    cmp = tmp_path / "cmp"
    for name in ("compare.html", "compare.md", "frontier.png", "results.json"):
        assert (cmp / name).is_file(), name
    rows = json.loads((cmp / "results.json").read_text())
    assert [(r["method"], r["strength"]) for r in rows] == [("sepo", 1.0), ("selective_dpo", 0.1), ("dpo", 0.1),
                                                            ("dpo", 0.5)]
    assert rows[2]["kl"] != rows[3]["kl"]  # the strength changes the training
    for run in ("sepo-sepo.gamma=1", "selective_dpo-selective_dpo.beta=0.1"):
        assert (cmp / "runs" / run / "oracle").is_symlink()  # one oracle, trained once, for both methods
    assert out.count("== oracle: done in") == 1 and out.count("== data: done in") == 1
    page = (cmp / "compare.html").read_text()
    for part in ("<h2>Reward against KL</h2>", "<h3>SePO</h3>", "<h3>Selective-DPO</h3>", "<h3>DPO</h3>",
                 "dpo.beta=0.5"):
        assert part in page, part
    assert page.count('<div class="pair">') == 3 * 3  # report.pairs pairs per method
    assert len((cmp / "compare.md").read_text().splitlines()) == 2 + 4

    code, out, _ = selpo(*args)  # everything finished: reused, not recomputed
    assert code == 0 and not re.findall(r"== \w+: done in", out)


def test_compare_grid_and_defaults():
    assert parse_grid(["dpo=dpo.beta:0.05,0.2"])["dpo"] == ("dpo.beta", (0.05, 0.2))
    with pytest.raises(ValueError, match="--grid takes METHOD=KEY:V1,V2"):
        parse_grid(["ppo=dpo.beta:1"])
    with pytest.raises(ValueError, match="must be numbers"):
        parse_grid(["dpo=dpo.beta:a"])
    config = load_config(None, ["data.max_train_pairs=50"])
    assert config.data.max_train_pairs == 50 and config.eval.prompts == 24  # the user's value, then the defaults
