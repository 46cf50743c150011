"""Every stage end to end through the `selpo` command on a tiny random Llama, and how runs are resumed,
skipped and refused (selpo.cli, selpo.stages)."""

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from selpo.context import DONE
from selpo.stages import pipeline
from selpo.testing import tiny_model_dir, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import PROMPTS, tiny_settings  # noqa: E402
from cli_runs import selpo as _selpo  # noqa: E402
from tiny_data import write_pairs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEPO_STAGES = pipeline("sepo")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    train = write_pairs(root / "train.jsonl", 30)
    return root, train, tiny_settings(tiny_model_dir(root), train, write_pairs(root / "test.jsonl", 8, seed=1))


@pytest.fixture(scope="module")
def run(tiny):
    """The whole pipeline, once: (run folder, exit code, printed output)."""
    root, _, settings = tiny
    run_dir = root / "run"
    code, out, err = _selpo("run", "--run-dir", run_dir, *settings)
    assert code == 0, err[-3000:]
    return run_dir, out


def _copy(run_dir, tmp_path):
    """A copy of the finished run to change (commands on it pass --run-dir, which beats its config.toml)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_run_writes_every_stage_and_prints_the_summary(run):
    run_dir, out = run
    for stage in SEPO_STAGES:
        assert (run_dir / stage / DONE).is_file(), stage
    assert not (run_dir / "guidance").exists()
    for path in ("data/train.jsonl", "data/test.jsonl", "data/report.json", "oracle/model/config.json",
                 "oracle/metrics.jsonl", "oracle/subset.json", "score/scored.jsonl", "train/model/config.json",
                 "train/model/tokenizer.json", "train/metrics.jsonl", "eval/results.json", "eval/samples.jsonl",
                 "report/curves.png", "report.html", "config.toml"):
        assert (run_dir / path).is_file(), path
    assert "reward (mean VADER compound of samples)" in out and "selected chosen tokens at VADER words" in out
    assert f"report: {run_dir / 'report.html'}" in out
    assert [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]
    assert len(json.loads((run_dir / "oracle" / "subset.json").read_text())) == 15  # 50% of 30 pairs


def test_data_report_counts_rows(run):
    report = json.loads((run[0] / "data" / "report.json").read_text())
    assert (report["train"]["rows"], report["train"]["kept"], report["test"]["kept"]) == (30, 30, 8)


def test_score_selects_top_and_bottom_tokens_per_response(run):
    rows = [json.loads(line) for line in (run[0] / "score" / "scored.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    for row in rows:
        for side, ratio, best in (("chosen", 0.3, max), ("rejected", 0.5, min)):
            ids, scores, mask = row[f"{side}_ids"], row[f"{side}_scores"], row[f"{side}_mask"]
            assert len(ids) == len(scores) == len(mask)
            assert sum(mask) == max(1, math.floor(ratio * len(ids) + 1e-9))
            picked = [s for s, m in zip(scores, mask) if m]
            rest = [s for s, m in zip(scores, mask) if not m]
            if rest:  # every selected score ranks above (chosen) or below (rejected) every other one
                assert (min(picked) >= max(rest)) if best is max else (max(picked) <= min(rest))
    assert any(s != 0 for row in rows for s in row["chosen_scores"])  # the oracle moved away from the reference


def test_eval_results_are_complete_and_in_range(run):
    results = json.loads((run[0] / "eval" / "results.json").read_text())
    assert (results["prompts"], results["samples"], results["test_pairs"]) == (PROMPTS, 2 * PROMPTS, 8)
    for model in ("initial", "policy"):
        assert -1 <= results[model]["reward"] <= 1
        assert 0 <= results[model]["likelihood_accuracy"] <= 1
    assert results["initial"]["kl"] == 0 and math.isfinite(results["policy"]["kl"])
    assert results["policy"]["kl"] != 0  # the policy was trained, so its samples are scored differently
    for key in ("chosen_precision", "chosen_random_precision", "rejected_precision", "rejected_random_precision"):
        assert 0 <= results["selection"][key] <= 1
    assert 0 <= results["oracle"]["implicit_accuracy"] <= 1
    samples = [json.loads(line) for line in (run[0] / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * PROMPTS and all(isinstance(s["policy"], str) for s in samples)


def test_report_has_its_parts(run):
    run_dir = run[0]
    page = (run_dir / "report.html").read_text()
    for part in ("<h2>Results</h2>", "<h2>Training curves</h2>", 'src="report/curves.png"',
                 "<h2>Tokens as SePO sees them</h2>", "<h2>Data</h2>", "<h2>Configuration</h2>",
                 "chosen_ratio = 0.3"):
        assert part in page, part
    assert (run_dir / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run_dir / "score" / "scored.jsonl").read_text().splitlines()][:3]
    selected = sum(sum(r["chosen_mask"]) + sum(r["rejected_mask"]) for r in rows)
    tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    assert page.count('class="tok"') == tokens and page.count("outline:2px") == selected
    assert page.count('<div class="pair">') == 3


def test_second_run_skips_every_finished_stage(run):
    run_dir = run[0]
    before = {s: (run_dir / s / DONE).read_text() for s in SEPO_STAGES}
    code, out, _ = _selpo("run", "--run-dir", run_dir)  # the run folder's config.toml is reused
    assert code == 0
    assert out.count("done, skipped") == len(SEPO_STAGES)
    assert before == {s: (run_dir / s / DONE).read_text() for s in SEPO_STAGES}


def test_changed_key_redoes_only_the_stages_that_depend_on_it(run, tmp_path):
    run_dir = _copy(run[0], tmp_path)
    code, out, err = _selpo("run", "--run-dir", run_dir, "--set", "eval.max_new_tokens=4")
    assert code == 0, err[-2000:]
    assert re.findall(r"== (\w+): done, skipped", out) == ["data", "oracle", "score", "train"]
    assert "== eval: redone, as its configuration changed (eval)" in out
    assert "== report: redone, as a stage it reads was redone since" in out


def test_stage_refuses_to_run_before_what_it_reads(tiny, tmp_path):
    _, _, settings = tiny
    code, _, err = _selpo("score", "--run-dir", tmp_path / "empty", *settings)
    assert code == 1
    assert "stage 'score' reads the output of stage 'data', which has not run; run `selpo data` first" in err


def test_stage_refuses_a_stale_input(run, tmp_path):
    run_dir = _copy(run[0], tmp_path)
    code, _, err = _selpo("train", "--run-dir", run_dir, "--set", "score.chosen_ratio=0.5")
    assert code == 1
    assert "stage 'score', which is stale: its configuration changed (score)" in err
    assert (run_dir / "train" / DONE).is_file()  # nothing was touched


def test_policy_with_another_tokenizer_is_refused(run, tmp_path):
    run_dir = _copy(run[0], tmp_path)
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<other>"])
    other = tiny_model_dir(tmp_path / "other", tokenizer=tokenizer)
    code, _, err = _selpo("train", "--run-dir", run_dir, "--set", f"train.policy={other}")
    assert code == 1 and "has a different tokenizer than the run's model" in err


def test_bad_rows_are_counted_or_raise_naming_file_and_row(tiny, tmp_path):
    _, train, settings = tiny
    bad = tmp_path / "bad.jsonl"
    lines = Path(train).read_text().splitlines()[:6]
    lines[2] = json.dumps({"prompt": "Review it.", "chosen": "  ", "rejected": "bad"})
    bad.write_text("\n".join(lines) + "\n")
    code, out, err = _selpo("data", "--run-dir", tmp_path / "r", *settings, "--set", f"data.train={bad}")
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "data" / "report.json").read_text())
    assert report["train"]["dropped"] == {"empty_response": 1} and report["train"]["kept"] == 5
    assert "1 dropped: empty_response 1 (line 3)" in out
    code, _, err = _selpo("data", "--run-dir", tmp_path / "s", *settings, "--set", f"data.train={bad}",
                          "--set", "data.strict=true")
    assert code == 1 and f"{bad} line 3" in err


def test_an_empty_data_file_is_named_in_selpos_own_error(tiny, tmp_path):
    _, _, settings = tiny
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = _selpo("data", "--run-dir", tmp_path / "r", *settings, "--set", f"data.test={empty}")
    assert code == 1 and f"selpo: error: {empty}: holds no rows of preference data" in err


def test_data_generate_regenerates_the_dataset_with_the_runs_model(tmp_path, monkeypatch):
    import selpo.sentiment

    calls = []

    def fake(out_dir, n_pairs, seed, *, test_pairs, model):
        calls.append((out_dir, n_pairs, seed, test_pairs, model))
        return {"train_pairs": n_pairs - test_pairs, "test_pairs": test_pairs}

    monkeypatch.setattr(selpo.sentiment, "generate_default_dataset", fake)
    code, out, _ = _selpo("data", "--generate", tmp_path / "gen", "--pairs", 50, "--test-pairs", 10,
                          "--set", "seed=4", "--run-dir", tmp_path / "r")
    assert code == 0 and calls == [(str(tmp_path / "gen"), 50, 4, 10, "default")]
    assert "40 + 10 pairs" in out and not (tmp_path / "r").exists()  # no run folder is touched


@pytest.mark.slow
def test_smoke_on_the_default_model_and_data(tmp_path):
    """SmolLM2-135M-Instruct and the packaged dataset, every stage at small sizes."""
    sizes = {"data.max_train_pairs": 16, "data.max_test_pairs": 4, "data.max_length": 96, "oracle.batch_size": 4,
             "oracle.micro_batch_size": 2, "oracle.max_steps": 2, "train.batch_size": 4, "train.micro_batch_size": 2,
             "train.max_steps": 2, "eval.prompts": 2, "eval.max_new_tokens": 8, "backend": "torch"}
    args = [arg for key, value in sizes.items() for arg in ("--set", f"{key}={value}")]
    code, out, err = _selpo("run", "--run-dir", tmp_path / "run", *args)
    assert code == 0, err[-3000:]
    assert (tmp_path / "run" / "report.html").is_file() and "reward (mean VADER compound of samples)" in out
