"""A new method is one file: a toy method defined here, registered, and run through `selpo run` and
`selpo compare` on a tiny model, with no other file of selpo touched (selpo.methods)."""

import json
import os
import sys
from pathlib import Path

import pytest

from selpo import methods
from selpo.compare import parse_grid
from selpo.data import TokenizedRanking
from selpo.examples import Example
from selpo.kernels import linear_logprobs, weighted_nll
from selpo.logprobs import response_states
from selpo.testing import tiny_model_dir

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import selpo, tiny_settings  # noqa: E402
from tiny_data import write_pairs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ChosenLikelihood:
    """The toy's objective: the mean over chosen responses of -sum_t log p(y_t), i.e. supervised fine-tuning
    on the preferred responses."""

    def loss(self, model, batch):
        hidden, head = response_states(model, batch.pairs)
        logps = linear_logprobs(hidden, head.weight, batch.pairs.targets, backend="torch", **head.op_kwargs())
        return weighted_nll(logps, logps.new_ones(logps.shape), batch.pairs.cu_seqlens, backend="torch")


class ChosenSFT(methods.Method):
    name = "chosen_sft"
    title = "chosen-response SFT"
    stages = ("data", "train", "eval", "report")
    strength = "train.lr"
    grid = (1e-3, 3e-3)

    def prepare(self, ctx, policy, tokenizer, key):
        chosen = [Example(TokenizedRanking(p.prompt_ids, [p.chosen_ids], row=p.row)) for p in ctx.pairs("train")]
        return methods.Prepared(ChosenLikelihood(), chosen)


@pytest.fixture
def toy(monkeypatch):
    """The toy registered for one test: the registry is a copy that monkeypatch puts back afterwards."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    return methods.register(ChosenSFT())


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_method")
    return tiny_settings(tiny_model_dir(root), write_pairs(root / "train.jsonl", 16),
                         write_pairs(root / "test.jsonl", 4, seed=1))


def test_a_registered_method_runs_through_selpo_run(toy, settings, tmp_path):
    code, out, err = selpo("run", "--run-dir", tmp_path / "run", *settings, "--set", "method=chosen_sft")
    assert code == 0, err[-3000:]
    for stage in ("data", "train", "eval", "report"):
        assert (tmp_path / "run" / stage / "DONE.json").is_file(), stage
    assert not (tmp_path / "run" / "oracle").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["nll"] < records[0]["nll"]
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["method"] == "chosen_sft" and results["policy"]["kl"] != 0 and "selection" not in results
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<h1>chosen-response SFT run" in page and methods.LOG_RATIO_LEGEND in page


def test_a_registered_method_runs_through_selpo_compare(toy, settings, tmp_path):
    assert parse_grid([])["chosen_sft"] == ("train.lr", (1e-3, 3e-3))  # its own strength and grid
    code, out, err = selpo("compare", "--dir", tmp_path / "cmp", "--methods", "chosen_sft",
                           "--grid", "chosen_sft=train.lr:0.003", *settings)  # one run of the grid's two
    assert code == 0, err[-3000:]
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [(r["method"], r["strength"]) for r in rows] == [("chosen_sft", 3e-3)] and rows[0]["kl"] != 0
    assert "| chosen-response SFT | train.lr=0.003 |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert "<h3>chosen-response SFT (train.lr=0.003)</h3>" in (tmp_path / "cmp" / "compare.html").read_text()


def test_registrations_do_not_outlive_their_test():
    assert "chosen_sft" not in methods.names()
    assert methods.names() == ("sepo", "selective_dpo", "guidance", "dpo", "simpo")


def test_registration_checks_the_method():
    with pytest.raises(ValueError, match="method 'dpo' is already registered"):
        methods.register(methods.get("dpo"))

    class Unfinished(methods.Method):
        name = "unfinished"

    with pytest.raises(ValueError, match="method Unfinished does not set title, stages, strength, grid"):
        methods.register(Unfinished())
    with pytest.raises(ValueError, match=r"method must be one of \('sepo', .*\), got 'ppo'"):
        methods.get("ppo")
