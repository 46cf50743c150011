"""A new method is one file: a toy method defined here, with an option of its own (its section [chosen_sft]) and a
stage of its own (``pick``, with its section [pick]), registered, or installed through an entry point of the group
``selpo.methods``, and run through `selpo run` and `selpo compare` on a tiny model, with no other file of selpo
touched (selpo.methods)."""

import json
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from selpo import cli, methods
from selpo import config as config_module
from selpo.batches import Example
from selpo.compare import parse_grid
from selpo.data import TokenizedRanking
from selpo.kernels import linear_logprobs, weighted_nll
from selpo.logprobs import response_states
from selpo.options import option, require
from selpo.stage import Stage
from selpo.stages.pipeline import fingerprint, pipeline
from selpo.testing import tiny_model_dir

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import selpo, tiny_settings  # noqa: E402
from tiny_data import write_pairs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class PickOptions:
    """The toy's stage pick: which training pairs its training reads."""

    SECTION: typing.ClassVar[str] = "pick"
    pairs: int = option(8, "How many training pairs (the first ones) the toy trains on.")


def run(ctx):
    """The stage ``pick`` (``Stage.module`` names this module): the rows of the first ``pick.pairs`` training pairs,
    written where the toy's training reads them."""
    rows = [p.row for p in ctx.pairs("train")[:ctx.config.pick.pairs]]
    if ctx.accelerator.is_main_process:
        (ctx.stage_dir("pick") / "rows.json").write_text(json.dumps(rows))
    return {"pairs": len(rows)}


PICK = Stage("pick", needs=("data",), keys=("pick",), help="pick the training pairs the toy trains on",
             module=__name__, options=PickOptions)


@dataclass
class ChosenSFTOptions:
    """The toy (method "chosen_sft"): supervised fine-tuning on the chosen responses."""

    SECTION: typing.ClassVar[str] = "chosen_sft"
    scale: float = option(1.0, "Multiplies the loss, the mean negative log-likelihood of the chosen responses.")

    def __post_init__(self):
        require(self.SECTION, "scale", self.scale > 0, f"must be > 0, got {self.scale}")


@dataclass
class ChosenLikelihood:
    """The toy's objective: ``scale`` times the mean over chosen responses of -sum_t log p(y_t), i.e. supervised
    fine-tuning on the preferred responses."""

    scale: float

    def loss(self, model, batch):
        hidden, head = response_states(model, batch.pairs)
        logps = linear_logprobs(hidden, head.weight, batch.pairs.targets, backend="torch", **head.op_kwargs())
        loss, metrics = weighted_nll(logps, logps.new_ones(logps.shape), batch.pairs.cu_seqlens, backend="torch")
        return self.scale * loss, metrics


class ChosenSFT(methods.Method):
    name = "chosen_sft"
    title = "chosen-response SFT"
    options = ChosenSFTOptions
    stages = (PICK,)
    strength = "train.lr"
    grid = (1e-3, 3e-3)

    def prepare(self, ctx, policy, tokenizer, key):
        rows = set(json.loads((ctx.stage_dir("pick") / "rows.json").read_text()))
        chosen = [Example(TokenizedRanking(p.prompt_ids, [p.chosen_ids], row=p.row)) for p in ctx.pairs("train")
                  if p.row in rows]
        return methods.Prepared(ChosenLikelihood(ctx.config.chosen_sft.scale), chosen)


@pytest.fixture
def toy(monkeypatch):
    """The toy registered for one test: the registry is a copy that monkeypatch puts back afterwards."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    return methods.register(ChosenSFT())


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The toy as another distribution ships it: an installed package's metadata on sys.path with an entry point
    of the group selpo.methods naming it, and a registry (a copy, put back afterwards) that has not read the entry
    points yet."""
    info = tmp_path / "site" / "toy_methods-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{methods.ENTRY_POINTS}]\nchosen_sft = {__name__}:ChosenSFT\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    monkeypatch.setattr(methods, "_entry_points_loaded", False)


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_method")
    return tiny_settings(tiny_model_dir(root), write_pairs(root / "train.jsonl", 16),
                         write_pairs(root / "test.jsonl", 4, seed=1))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


def test_a_registered_method_runs_through_selpo_run(toy, settings, tmp_path):
    code, out, err = selpo("run", "--run-dir", tmp_path / "run", *settings, "--set", "method=chosen_sft")
    assert code == 0, err[-3000:]
    for stage in ("data", "pick", "train", "eval", "report"):
        assert (tmp_path / "run" / stage / "DONE.json").is_file(), stage
    assert out.index("== pick: done") < out.index("== train: train the policy")
    assert not (tmp_path / "run" / "oracle").exists()
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["nll"] < records[0]["nll"]
    assert all(r["loss"] == pytest.approx(r["nll"], rel=1e-5) for r in records)  # chosen_sft.scale = 1
    train = json.loads((tmp_path / "run" / "train" / "DONE.json").read_text())
    assert train["summary"]["pairs"] == 8 and train["config"]["chosen_sft"] == {"scale": 1.0}  # pick.pairs = 8
    assert json.loads((tmp_path / "run" / "pick" / "DONE.json").read_text())["config"]["pick"] == {"pairs": 8}
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["method"] == "chosen_sft" and results["policy"]["kl"] != 0 and "selection" not in results
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<h1>chosen-response SFT run" in page and methods.LOG_RATIO_LEGEND in page
    assert "[chosen_sft]" in page and "[pick]" in page  # the configuration it shows


def test_an_installed_method_runs_through_its_entry_point(installed, settings, tmp_path):
    assert "chosen_sft" not in methods._REGISTRY  # not read yet: the first look at the registry reads it
    code, out, err = selpo("run", "--run-dir", tmp_path / "run", *settings, "--set", "method=chosen_sft",
                           "--set", "chosen_sft.scale=0.5", "--set", "pick.pairs=12")
    assert code == 0, err[-3000:]
    assert methods.names()[-1] == "chosen_sft" and pipeline("chosen_sft") == ("data", "pick", "train", "eval",
                                                                              "report")
    records = _records(tmp_path / "run")
    assert all(r["loss"] == pytest.approx(0.5 * r["nll"], rel=1e-5) for r in records)  # its option, read
    assert json.loads((tmp_path / "run" / "train" / "DONE.json").read_text())["summary"]["pairs"] == 12


def test_a_broken_entry_point_is_named(installed, tmp_path):
    info = next((tmp_path / "site").glob("*.dist-info"))
    (info / "entry_points.txt").write_text(f"[{methods.ENTRY_POINTS}]\nsft = {__name__}:ChosenSFT\n")
    with pytest.raises(ValueError, match=rf"entry point sft = {__name__}:ChosenSFT \(group selpo.methods\) gives "
                                         "method 'chosen_sft': the names must match"):
        methods.names()


def test_the_toys_keys_are_documented_and_fingerprinted(toy, settings, capsys):
    assert cli.main(["config", "--keys"]) == 0
    text = capsys.readouterr().out
    assert "[chosen_sft]\n  chosen_sft.scale = 1.0  (a float)" in text and "[pick]\n  pick.pairs = 8  (an int)" in text
    base = config_module.load(None, [*settings[1::2], "method=chosen_sft"])
    scaled = config_module.apply_overrides(base, ["chosen_sft.scale=2"])
    fewer = config_module.apply_overrides(base, ["pick.pairs=4"])
    assert fingerprint(scaled, "pick") == fingerprint(base, "pick") != fingerprint(fewer, "pick")
    assert len({fingerprint(c, "train") for c in (base, scaled, fewer)}) == 3
    with pytest.raises(ValueError, match=r"chosen_sft\.scale must be > 0, got -1\.0"):
        config_module.apply_overrides(base, ["chosen_sft.scale=-1"])


def test_a_registered_method_runs_through_selpo_compare(toy, settings, tmp_path):
    assert parse_grid([])["chosen_sft"] == ("train.lr", (1e-3, 3e-3))  # its own strength and grid
    code, out, err = selpo("compare", "--dir", tmp_path / "cmp", "--methods", "chosen_sft",
                           "--grid", "chosen_sft=train.lr:0.003", *settings)  # one run of the grid's two
    assert code == 0, err[-3000:]
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [(r["method"], r["strength"]) for r in rows] == [("chosen_sft", 3e-3)] and rows[0]["kl"] != 0
    assert "| chosen-response SFT | train.lr=0.003 |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert "<h3>chosen-response SFT (train.lr=0.003)</h3>" in (tmp_path / "cmp" / "compare.html").read_text()
    assert (tmp_path / "cmp" / "runs" / "chosen_sft-train.lr=0.003" / "pick").is_symlink()  # a stage before train


def test_registrations_do_not_outlive_their_test():
    assert "chosen_sft" not in methods.names() and "pick" not in methods.stages()
    assert methods.names() == ("sepo", "selective_dpo", "guidance", "dpo", "simpo")
    assert not {"chosen_sft", "pick"} & set(config_module.section_names())


def test_registration_checks_the_method(monkeypatch):
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    with pytest.raises(ValueError, match="method 'dpo' is already registered"):
        methods.register(methods.get("dpo"))

    class Unfinished(methods.Method):
        name = "unfinished"

    with pytest.raises(ValueError, match="method Unfinished does not set title, strength, grid"):
        methods.register(Unfinished())
    with pytest.raises(ValueError, match=r"method must be one of \('sepo', .*\), got 'ppo'"):
        methods.get("ppo")

    class Named(ChosenSFT):
        name = "named"

    with pytest.raises(ValueError, match=r"options: ChosenSFTOptions.SECTION must be 'named', the section it becomes"):
        methods.register(Named())

    class OldStyle(ChosenSFT):
        stages = ("data", "train", "eval", "report")

    with pytest.raises(ValueError, match="stages holds the stages it runs between data and train, each a "
                                         r"selpo.stage.Stage, got 'data'"):
        methods.register(OldStyle())

    class Blind(ChosenSFT):
        stages = (Stage("peek", needs=("data", "oracle"), keys=(), help="reads an oracle it does not run"),)

    with pytest.raises(ValueError, match="stage 'peek' must name the stages it reads .*: data$"):
        methods.register(Blind())
