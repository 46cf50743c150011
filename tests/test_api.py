"""selpo from Python (selpo.api): ``selpo.run`` and ``selpo.run_stage`` on the tiny model and data, taking the
configuration as the command line does and returning what the stages recorded."""

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

import selpo
from selpo import api
from selpo.config import load, to_toml, tomllib
from selpo.context import DONE
from selpo.run_folder import LOGS
from selpo.stages import StageError

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import tiny_run_settings  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, the tiny settings as a RunConfig)."""
    root = tmp_path_factory.mktemp("api")
    return root, load(None, tiny_run_settings(root)[1::2])


@pytest.fixture(scope="module")
def finished(tiny):
    """``selpo.run`` of a dpo run: (run folder, what it returned)."""
    root, config = tiny
    run_dir = root / "run"
    results = selpo.run(config, run_dir=str(run_dir), method="dpo", train={"max_steps": 2})
    return run_dir, results


def test_run_returns_every_stages_summary_with_evals_results(finished):
    run_dir, results = finished
    assert list(results) == ["data", "train", "eval", "report"]
    for name, summary in results.items():
        assert summary == json.loads((run_dir / name / DONE).read_text())["summary"], name
    policy = results["eval"]["policy"]
    assert 0 <= policy["implicit_accuracy"] <= 1 and isinstance(policy["kl"], float)
    assert results["train"]["step"] == 2  # the keyword option reached the training
    assert not (run_dir / LOGS).exists()  # report_to = none by default


def test_a_second_run_skips_and_returns_the_same(finished, tiny):
    run_dir, results = finished
    _, config = tiny
    assert selpo.run(config, run_dir=str(run_dir), method="dpo", train={"max_steps": 2}) == results


def test_run_stage_runs_one_stage_from_the_folders_saved_config(finished, capsys):
    run_dir, _ = finished
    summary = selpo.run_stage("report", run_dir=str(run_dir), report={"pairs": 1})
    assert summary == {"report": str(run_dir / "report.html")}
    assert f"report: {run_dir / 'report.html'}" in capsys.readouterr().out
    assert "pairs = 1" in (run_dir / "config.toml").read_text()


def test_a_stage_that_cannot_run_yet_raises_the_clis_error(tiny, tmp_path):
    _, config = tiny
    with pytest.raises(StageError, match="reads the output of stage 'data', which has not run"):
        selpo.run_stage("train", config, run_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("options, key", [({"train": {"lrr": 1e-3}}, "train.lrr"), ({"sed": 1}, "sed"),
                                          ({"train": {"lr": "fast"}}, "train.lr")])
def test_a_bad_key_or_value_raises_naming_it_before_any_work(tiny, tmp_path, options, key):
    _, config = tiny
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        selpo.run(config, run_dir=str(tmp_path / "run"), **options)
    assert not (tmp_path / "run").exists()


def test_an_unknown_stage_is_named():
    with pytest.raises(ValueError, match="stage: unknown stage 'nope'"):
        selpo.run_stage("nope")


def test_a_config_as_object_dict_or_toml_file_gives_the_same(tiny, tmp_path):
    _, config = tiny
    path = tmp_path / "my.toml"
    path.write_text(to_toml(config))
    as_dict = tomllib.loads(path.read_text())
    options = {"seed": 3, "train": {"lr": 1e-6}, "sepo": {"gamma": 2.0, "margin": 0.5},
               "data": {"max_test_pairs": None}}
    items = api.overrides(options)
    assert items == ["seed=3", "train.lr=1e-06", "sepo.gamma=2.0", "sepo.margin=0.5", "data.max_test_pairs=none"]
    resolved = [api.resolve_config(source, items) for source in (config, as_dict, path)]
    assert resolved[0] == resolved[1] == resolved[2]
    assert resolved[0].seed == 3 and resolved[0].train.lr == 1e-6 and resolved[0].data.max_test_pairs is None
    assert (resolved[0].sepo.gamma, resolved[0].sepo.margin) == (2.0, 0.5)


def test_the_docs_python_block_runs_on_the_tiny_model(tiny, tmp_path, monkeypatch):
    """The ``selpo.run`` example of docs/models.md ("From Python") as it is written, starting from the tiny model
    and data instead of the defaults: a LoRA DPO run logged to TensorBoard, printing the policy's and the initial
    model's reward. It is the one ```py block of README.md and the docs/ pages."""
    root = Path(__file__).parent.parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    blocks = {page.name: re.findall(r"```py\n(.*?)```", page.read_text(), flags=re.S) for page in pages}
    assert {name: len(found) for name, found in blocks.items() if found} == {"models.md": 1}
    blocks = blocks["models.md"]
    assert "selpo.run(" in blocks[0]
    _, config = tiny
    real_run = selpo.run
    monkeypatch.setattr(selpo, "run", lambda *args, **options: real_run(config, **options))
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(blocks[0], {})
    policy, initial = (float(x) for x in printed.getvalue().splitlines()[-1].split())
    run_dir = tmp_path / "runs" / "lora"
    results = json.loads((run_dir / "eval" / DONE).read_text())["summary"]
    assert (policy, initial) == (results["policy"]["reward"], results["initial"]["reward"])
    assert (run_dir / "train" / "model" / "adapter_config.json").is_file()
    assert list((run_dir / LOGS).rglob("events.out.tfevents.*"))
