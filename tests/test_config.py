"""The run configuration (selpo.config) and the command line around it (selpo.cli): TOML, --set, --help."""

import dataclasses
import subprocess
import sys
import typing

import pytest

from selpo import cli
from selpo import config as cfg
from selpo.methods.oracle import OracleConfig


def test_defaults_round_trip_through_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml(cfg.RunConfig()))
    assert cfg.load(path) == cfg.RunConfig()


def test_changed_values_round_trip_through_toml(tmp_path):
    changed = cfg.load(None, ["seed=7", "model=/models/x", "train.lr=3e-7", "train.policy=/models/big",
                              "data.strict=true", "oracle.max_steps=12", "score.chosen_ratio=0.5",
                              "run_dir=some where/with \"quotes\""])
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml(changed))
    assert cfg.load(path) == changed
    assert changed.data.strict is True and changed.oracle.max_steps == 12 and changed.train.lr == 3e-7


def test_toml_file_then_set_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('seed = 3\n[train]\nlr = 1\nbatch_size = 16\n[eval]\nprompts = 5\n')
    config = cfg.load(path, ["train.lr=2e-6"])
    assert (config.seed, config.train.lr, config.train.batch_size, config.eval.prompts) == (3, 2e-6, 16, 5)
    assert isinstance(cfg.load(path).train.lr, float)  # an integer in TOML is fine for a float key


@pytest.mark.parametrize("text, expected", [("true", True), ("yes", True), ("1", True), ("False", False),
                                            ("off", False), ("0", False)])
def test_set_parses_booleans(text, expected):
    assert cfg.load(None, [f"data.strict={text}"]).data.strict is expected


def test_set_none_clears_an_optional_key():
    config = cfg.load(None, ["train.max_steps=5"])
    assert cfg.apply_overrides(config, ["train.max_steps=none"]).train.max_steps is None


def test_set_order_does_not_matter():
    a = cfg.load(None, ["train.batch_size=2", "train.micro_batch_size=2"])
    b = cfg.load(None, ["train.micro_batch_size=2", "train.batch_size=2"])
    assert a == b and a.train.batch_size == 2


def test_unknown_key_suggests_the_closest_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config key 'train\.lrr' \(did you mean 'train\.lr'\?\); "
                                         r"valid keys: .*train\.lr,"):
        cfg.load(None, ["train.lrr=1"])
    with pytest.raises(ValueError, match=r"unknown config key 'oracle\.fracton' \(did you mean 'oracle\.fraction'"):
        cfg.load(None, ["oracle.fracton=0.5"])
    with pytest.raises(ValueError, match=r"unknown config key 'zzz'; valid keys"):  # nothing close: no guess
        cfg.load(None, ["zzz=1"])


def test_set_needs_key_equals_value():
    with pytest.raises(ValueError, match="--set takes key=value"):
        cfg.load(None, ["train.lr"])


@pytest.mark.parametrize("item, message", [
    ("train.lr=fast", r"train\.lr takes a float, got 'fast'"),
    ("eval.prompts=2.5", r"eval\.prompts takes an int, got '2\.5'"),
    ("data.strict=maybe", r"data\.strict takes a bool, got 'maybe'"),
    ("oracle.max_steps=many", r"oracle\.max_steps takes an int or none"),
])
def test_set_rejects_values_of_the_wrong_type(item, message):
    with pytest.raises(ValueError, match=message):
        cfg.load(None, [item])


@pytest.mark.parametrize("item, message", [
    ("oracle.fraction=0", r"oracle\.fraction must lie in \(0, 1\], got 0"),
    ("score.rejected_ratio=1.5", r"score\.rejected_ratio must lie in \(0, 1\]"),
    ("train.batch_size=6", r"train\.batch_size \(6\) must be a multiple of micro_batch_size \(4\)"),
    ("train.lr=-1", r"train\.lr must be > 0"),
    ("oracle.warmup_ratio=1", r"oracle\.warmup_ratio must lie in \[0, 1\)"),
    ("data.max_prompt_length=0", r"data\.max_prompt_length must be >= 1, got 0"),
    ("device=tpu", r"device must be one of"),
    ("backend=fast", r"backend must be one of"),
    ("eval.temperature=0", r"eval\.temperature must be > 0"),
])
def test_bad_values_name_their_key(item, message):
    with pytest.raises(ValueError, match=message):
        cfg.load(None, [item])


@pytest.mark.parametrize("old, new", [("train.beta", "dpo.beta, selective_dpo.beta and simpo.beta"),
                                      ("train.gamma", "sepo.gamma"), ("train.margin", "sepo.margin and simpo.gamma"),
                                      ("train.selective_ratio", "selective_dpo.ratio"),
                                      ("train.selective_rule", "selective_dpo.rule")])
def test_a_key_that_moved_to_its_methods_section_names_where(old, new, tmp_path):
    section, name = new.partition(" ")[0].split(".")
    with pytest.raises(ValueError, match=rf"--set: {old} moved to {new}: .* --set {section}\.{name}="):
        cfg.load(None, [f"{old}=1"])
    path = tmp_path / "old.toml"
    path.write_text(f"[train]\nlr = 1e-6\n{old.partition('.')[2]} = 1\n")
    with pytest.raises(ValueError, match=rf"old\.toml: {old} moved to {new}: .* \[{section}\] {name} = "):
        cfg.load(path)


def test_each_methods_options_are_its_own_section_with_the_papers_defaults():
    config = cfg.RunConfig()
    assert (config.sepo.gamma, config.sepo.margin) == (1.0, 0.0)
    assert (config.dpo.beta, config.oracle.beta) == (0.1, 0.1)
    assert (config.selective_dpo.beta, config.selective_dpo.ratio, config.selective_dpo.rule) == (0.1, 0.4, "topk")
    assert (config.simpo.beta, config.simpo.gamma) == (2.0, 0.5)
    moved = {"beta", "gamma", "margin", "selective_ratio", "selective_rule"}
    assert not moved & set(cfg.scalar_fields(cfg.TrainConfig))
    with pytest.raises(ValueError, match=r"simpo\.beta must be > 0, got 0\.0"):
        cfg.load(None, ["simpo.beta=0"])
    with pytest.raises(AttributeError, match="RunConfig has no key or section 'nope'"):
        config.nope


def test_toml_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[train]\nlrr = 1\n')
    with pytest.raises(ValueError, match=r"bad\.toml: unknown key\(s\) lrr \(did you mean 'lr'\?\) in section "
                                         r"\[train\]; valid keys: epochs"):
        cfg.load(path)
    path.write_text('[train]\nlr = "fast"\n')
    with pytest.raises(ValueError, match=r"train\.lr takes a float, got 'fast'"):
        cfg.load(path)
    path.write_text('train = 3\n')
    with pytest.raises(ValueError, match=r"train must be a table \[train\]"):
        cfg.load(path)
    path.write_text('[train\n')
    with pytest.raises(ValueError, match="not valid TOML"):
        cfg.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cfg.load(tmp_path / "missing.toml")


def _all_fields():
    classes = [cfg.RunConfig] + list(cfg.section_classes().values())
    return [(c, name, t, f) for c in classes for name, (t, f) in cfg.scalar_fields(c).items()]


def test_every_field_is_documented_and_optional_ones_default_to_none():
    # to_toml leaves None out (TOML has no null), which reads back right only if None is the default.
    for cls, name, t, f in _all_fields():
        assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{name} has no documentation"
        if type(None) in typing.get_args(t):
            assert f.default is None, f"{cls.__name__}.{name} may be None but defaults to {f.default!r}"


def test_every_key_is_settable_and_listed():
    keys = cfg.all_keys()
    assert len(keys) == len(_all_fields())
    assert {"seed", "method", "train.lr", "oracle.fraction", "guidance.aggregation", "score.chosen_ratio",
            "eval.prompts", "report.pairs", "sepo.gamma", "sepo.margin", "selective_dpo.ratio", "dpo.beta",
            "simpo.gamma"} <= set(keys)
    assert cfg.section_names() == ("data", "oracle", "score", "train", "sepo", "selective_dpo", "guidance", "dpo",
                                   "simpo", "eval", "report")
    assert dataclasses.fields(OracleConfig)[0].name == "epochs"  # the shared loop settings come first


def test_cli_config_prints_loadable_documented_toml(tmp_path, capsys):
    assert cli.main(["config", "--run-dir", str(tmp_path / "r"), "--set", "sepo.gamma=2.5"]) == 0
    text = capsys.readouterr().out
    assert "[sepo]\n# SePO (method \"sepo\")" in text and "# Reward scale gamma" in text and "gamma = 2.5" in text
    path = tmp_path / "printed.toml"
    path.write_text(text)
    assert cfg.load(path).sepo.gamma == 2.5


def test_cli_config_keys_lists_every_key(capsys):
    assert cli.main(["config", "--keys"]) == 0
    text = capsys.readouterr().out
    assert all(key in text for key in cfg.all_keys())


def test_cli_uses_the_run_folders_saved_config(tmp_path, capsys):
    from selpo.run_folder import RunFolder

    run_dir = tmp_path / "r"
    folder = RunFolder(run_dir)
    folder.prepare()
    folder.write_own_file("config.toml", cfg.to_toml(cfg.load(None, ["seed=11", f"run_dir={run_dir}"])))
    assert cli.main(["config", "--run-dir", str(run_dir), "--set", "eval.prompts=3"]) == 0
    text = capsys.readouterr().out
    assert "seed = 11" in text and "prompts = 3" in text
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.toml").write_text("seed = 12\n")  # not selpo's: never read as the run's settings
    assert cli.main(["config", "--run-dir", str(tmp_path / "mine")]) == 1
    assert "config.toml was not written by selpo" in capsys.readouterr().err


@pytest.mark.parametrize("command, keys", [("data", ["data.max_length", "model ="]),
                                           ("oracle", ["oracle.fraction", "oracle.beta", "seed ="]),
                                           ("score", ["score.chosen_ratio", "score.rejected_ratio"]),
                                           ("train", ["sepo.gamma", "dpo.beta", "train.policy", "train.lr"]),
                                           ("eval", ["eval.prompts", "eval.max_new_tokens"]),
                                           ("report", ["report.pairs"])])
def test_each_stage_help_explains_itself_and_its_keys(command, keys, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--set KEY=VALUE" in text and "--run-dir" in text and "Reads the outputs of" in text
    assert all(key in text for key in keys), text


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert all(c in text for c in ("data", "oracle", "score", "train", "eval", "report", "run", "config"))


def test_cli_reports_bad_settings_without_a_traceback(tmp_path, capsys):
    assert cli.main(["config", "--set", "train.lr=fast"]) == 1
    assert "selpo: error: train.lr takes a float" in capsys.readouterr().err


def test_config_keys_into_a_closed_pipe_exits_quietly():
    """`selpo config --keys | head -1`: the reader leaves early; no BrokenPipeError traceback, exit status 0."""
    command = [sys.executable, "-m", "selpo.cli", "config", "--keys"]
    closed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    closed.stdout.close()  # before anything is written: every write fails
    assert closed.wait(timeout=120) == 0 and closed.stderr.read() == b""
    closed.stderr.close()
    shell = subprocess.run(["bash", "-c", "set -o pipefail; \"$0\" -m selpo.cli config --keys | head -1",
                            sys.executable], capture_output=True, text=True, timeout=120)
    assert (shell.returncode, shell.stdout, shell.stderr) == (0, "run-wide keys:\n", "")
