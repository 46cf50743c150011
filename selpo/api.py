"""selpo from Python (a script, a notebook): ``selpo.run(...)`` runs every stage not yet done, ``selpo.run_stage(name,
...)`` one stage; each returns the metrics its stages recorded. The ``selpo`` command calls the same functions.

The configuration is given as on the command line: ``config`` is a ``RunConfig``, a nested dict shaped like a
TOML file (run-wide keys at the top, a dict per section), a path to a TOML file, or None (the defaults, or the
run folder's own ``config.toml`` when selpo saved one there); keyword options override it as ``--set`` does,
shaped like the TOML file too: a run-wide key as a keyword, a section as a dict::

    selpo.run("my.toml", run_dir="runs/x", method="dpo", report_to="tensorboard", train={"lr": 1e-6})

An unknown key or a bad value raises ValueError naming it, before any work; a stage that cannot run yet raises
``StageError``: the errors the command prints. Progress bars are off unless ``progress=True`` (then drawn as the
command draws them: on a terminal's stderr).
"""

from __future__ import annotations

import os
from typing import Union

from . import config as config_module
from . import progress as progress_module
from .config import RunConfig
from .run_folder import RunFolder
from .stages import Context, clear_stage, run_all, stages
from .stages import run_stage as _run_stage

ConfigSource = Union[RunConfig, dict, str, os.PathLike, None]


def _override_text(value) -> str:
    """A keyword option's value as ``--set`` writes it (``apply_overrides`` parses and checks it)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def overrides(options: dict) -> list[str]:
    """Keyword options (``seed=1``, ``train={"lr": 1e-6}``) as ``--set`` items (``seed=1``, ``train.lr=1e-06``)."""
    items = []
    for key, value in options.items():
        table = value if isinstance(value, dict) else {"": value}
        items += [f"{key}.{name}={_override_text(v)}" if name else f"{key}={_override_text(v)}"
                  for name, v in table.items()]
    return items


def _named(config: ConfigSource, items: list[str]) -> RunConfig:
    """``config`` (a RunConfig, a TOML-shaped dict, a TOML file's path, None: the defaults) with ``items`` applied."""
    if isinstance(config, RunConfig):
        return config_module.apply_overrides(config, items)
    if isinstance(config, dict):
        return config_module.apply_overrides(config_module.from_dict(config, "config"), items)
    return config_module.load(config, items)


def resolve_config(config: ConfigSource = None, items: list[str] = ()) -> RunConfig:
    """Defaults < the run folder's saved config.toml (if selpo wrote one and no ``config`` is given) or ``config``
    < ``items`` (``key=value`` overrides, ``--set``'s).

    The run folder is the ``run_dir`` of ``config`` and ``items``, never the run_dir a saved config.toml holds. A
    ``module:function`` reward (code that importing runs) taken from a saved config.toml must be confirmed by an
    override: a run folder alone never chooses code to run.
    """
    from .rewards import runs_code  # here: it brings torch, which `selpo --help` does without

    items = list(items)
    named = _named(config, items)
    folder = RunFolder(named.run_dir)
    if isinstance(config, (str, os.PathLike)):
        folder.check_input("--config", config)
    saved = folder.own_file("config.toml")
    if config is not None or saved is None:
        return named
    resolved = config_module.load(saved, items + [f"run_dir={named.run_dir}"])
    spec = resolved.eval.reward
    if runs_code(spec) and spec != named.eval.reward:
        raise ValueError(f"eval.reward: {saved} sets {spec!r}, a function selpo would import, which runs that "
                         "module's code; settings read from a run folder never choose code to run by themselves. "
                         f"Confirm it with --set eval.reward={spec} (or name it in a --config file)")
    return resolved


def execute(config: RunConfig, stage: str | None = None, *, fresh: bool = False,
            progress: bool = False) -> dict[str, dict]:
    """Runs every stage not yet done (``stage`` None) or stage ``stage`` (after removing its outputs: ``fresh``) in
    ``config``'s run folder, prints the results table after eval and the report's path after report, and returns
    the DONE record (fingerprint, configuration, seconds, summary) of each stage of the run."""
    from .trainer import make_accelerator  # here: it brings torch, which `selpo --help` does without

    quiet = progress_module.QUIET
    progress_module.QUIET = not progress
    try:
        ctx = Context(config, make_accelerator(config))
        ctx.print(f"run folder: {ctx.run_dir}")
        if stage is None:
            records = run_all(ctx)
        else:
            if fresh:
                clear_stage(ctx, stage)
            records = {stage: _run_stage(ctx, stage)}
    finally:
        progress_module.QUIET = quiet
    if ctx.accelerator.is_main_process:
        _print_results(ctx, records)
    return records


def _print_results(ctx: Context, records: dict) -> None:
    """The results table after eval, the report's path (in this run folder, wherever it was first written)
    after report."""
    if "eval" in records:
        from .stages.report import summary_text

        print("\n" + summary_text(records["eval"]["summary"]))
    if "report" in records:
        print(f"\nreport: {ctx.run_dir / 'report.html'}")


def run(config: ConfigSource = None, /, *, progress: bool = False, **options) -> dict[str, dict]:
    """Runs every stage of the configured method not yet done, in order, as ``selpo run`` does; returns each stage's
    summary (the ``summary`` of its DONE.json) by stage name: ``["eval"]`` holds the results (``policy``,
    ``initial``: reward, kl, accuracies, margins; ``win_rate`` with a reward model or function), ``["train"]`` the
    last logged training step. ``config`` and ``options``: this module's docstring."""
    records = execute(resolve_config(config, overrides(options)), progress=progress)
    return {name: record["summary"] for name, record in records.items()}


def run_stage(stage: str, config: ConfigSource = None, /, *, fresh: bool = False, progress: bool = False,
              **options) -> dict:
    """Runs stage ``stage`` (data, oracle, guidance, score, train, eval, report) as ``selpo <stage>`` does, again if
    it was done (``fresh``: its outputs removed first, instead of resuming an interrupted training); the stages it
    reads must be done. Returns its summary."""
    if stage not in stages():
        raise ValueError(f"stage: unknown stage {stage!r}; stages: {', '.join(stages())}")
    return execute(resolve_config(config, overrides(options)), stage, fresh=fresh, progress=progress)[stage]["summary"]
