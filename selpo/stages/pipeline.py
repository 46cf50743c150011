"""The stages of a run, what each depends on, and how finished work is recognised and skipped.

Every stage reads and writes ``run_dir/<stage>/`` and, as its very last act, writes ``DONE.json``
holding its fingerprint: a hash of the configuration keys it depends on, of the contents of the input files
those keys name (``selpo.input_hashes``) and of the fingerprints of the stages it reads. A stage is *done*
when its ``DONE.json`` carries the fingerprint the current configuration and inputs give; *stale* when it
carries another (a key it depends on changed, an input file was edited, or an upstream stage was redone);
*missing* otherwise. ``selpo run`` runs every stage that is not done, in order; a single stage's command
runs that stage, after checking the stages it reads are done. Every command holds the run folder's lock
and writes only what ``selpo.run_folder`` allows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import time
from dataclasses import dataclass

from .. import config as config_module
from .. import tracking
from ..atomic import write_text_atomic
from ..config import RunConfig
from ..context import DONE, Context
from ..input_hashes import input_hashes, input_paths
from ..run_folder import LOGS, OWN_FILES, RunFolderError


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, implemented by ``run(ctx) -> dict`` (a JSON summary kept in its DONE.json)
    in the module ``selpo.stages.<name>``, imported only when the stage runs (so ``--help`` stays fast)."""

    name: str
    # Stages whose outputs it reads (they must be done first).
    needs: tuple[str, ...]
    # Configuration keys its result depends on: run-wide keys or whole sections.
    keys: tuple[str, ...]
    # One line for --help and the logs.
    help: str

    def keys_for(self, method: str) -> tuple[str, ...]:
        """Its keys, and those its result depends on under ``method`` only (``Method.stage_keys``)."""
        from .. import methods  # imported when a run needs it: it brings torch, which `selpo --help` does without

        return self.keys + tuple(methods.get(method).stage_keys.get(self.name, ()))

    def run(self, ctx: Context) -> dict:
        return importlib.import_module(f"{__package__}.{self.name}").run(ctx)


STAGES = (
    Stage("data", needs=(), keys=("model", "data"), help="validate and tokenize the training and held-out pairs"),
    Stage("oracle", needs=("data",), keys=("model", "seed", "oracle"),
          help="DPO-train a copy of the initial model on a share of the training pairs (SePO's oracle, "
          "Selective-DPO's reference)"),
    Stage("guidance", needs=("data",), keys=("model", "seed", "guidance"),
          help="train the token-level guidance model on a share of the training pairs"),
    Stage("score", needs=("data", "oracle"), keys=("score",),
          help="score every response token with the oracle and select the key tokens (SePO)"),
    Stage("train", needs=("data", "oracle", "guidance", "score"), keys=("seed", "method", "train"),
          help="train the policy with the run's method"),
    Stage("eval", needs=("data", "oracle", "guidance", "score", "train"), keys=("seed", "eval"),
          help="sample the initial model and the policy on held-out prompts and compare them"),
    Stage("report", needs=("data", "oracle", "guidance", "score", "train", "eval"), keys=("report",),
          help="write report.html: configuration, results, training curves, token heatmap"),
)


class StageError(RuntimeError):
    """A stage cannot run yet: a stage it reads is missing or stale."""


def stages() -> dict[str, Stage]:
    """All stages by name, in pipeline order."""
    return {s.name: s for s in STAGES}


def pipeline(method: str) -> tuple[str, ...]:
    """The stages ``method`` runs (``Method.stages``), in order, each one checked to exist."""
    from .. import methods  # as in Stage.keys_for

    names = methods.get(method).stages
    unknown = [name for name in names if name not in stages()]
    if unknown:
        raise ValueError(f"method {method!r} runs unknown stage(s) {', '.join(unknown)}; stages: "
                         f"{', '.join(stages())}")
    return names


def needs(config: RunConfig, name: str) -> tuple[str, ...]:
    """The stages stage ``name`` reads under ``config``'s method: those of its ``needs`` the method runs."""
    return tuple(up for up in stages()[name].needs if up in pipeline(config.method))


# Keys that change how a result is computed, never what it is (up to float rounding): in no fingerprint.
UNFINGERPRINTED = ("data.packing",)


def _config_values(config: RunConfig, keys: tuple[str, ...]) -> dict:
    values = {}
    for key in keys:
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if dataclasses.is_dataclass(value):
            value = {name: v for name, v in config_module.to_dict(value).items()
                     if f"{key}.{name}" not in UNFINGERPRINTED}
        values[key] = value
    return values


def fingerprint(config: RunConfig, name: str) -> str:
    """The hash a finished stage ``name`` must carry to count as done under ``config`` and its inputs."""
    keys = stages()[name].keys_for(config.method)
    material = {"config": _config_values(config, keys), "inputs": input_hashes(config, keys),
                "needs": {up: fingerprint(config, up) for up in needs(config, name)}}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def status(ctx: Context, name: str) -> str:
    """"done", "stale" or "missing"."""
    record = ctx.done_record(name)
    if record is None:
        return "missing"
    return "done" if record["fingerprint"] == fingerprint(ctx.config, name) else "stale"


def _changed(old: dict, new: dict) -> list[str]:
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _why_stale(ctx: Context, name: str) -> str:
    record = ctx.done_record(name)
    keys = stages()[name].keys_for(ctx.config.method)
    changed = _changed(record.get("config", {}), _config_values(ctx.config, keys))
    if changed:
        return f"its configuration changed ({', '.join(changed)})"
    edited = _changed(record.get("inputs", {}), input_hashes(ctx.config, keys))
    if edited:
        return f"the contents of its input changed ({', '.join(edited)})"
    return "a stage it reads was redone since"


def _on_main(ctx: Context, fn) -> None:
    """Runs ``fn`` on the main process; a ``RunFolderError`` it raises there is raised on every process."""
    error = None
    if ctx.accelerator.is_main_process:
        try:
            fn()
        except RunFolderError as e:
            error = str(e)
    if ctx.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise RunFolderError(error)


def check_folder(ctx: Context) -> None:
    """Before any work: no input inside the run folder, no file of the user's where selpo writes its own."""
    for key, path in input_paths(ctx.config).items():
        ctx.folder.check_input(key, path)
    for name in OWN_FILES:
        ctx.folder.own_file(name)


@contextlib.contextmanager
def working(ctx: Context):
    """Checks the run folder (``check_folder``, before anything is written), then holds its lock (the main
    process takes it) for the block."""
    with contextlib.ExitStack() as stack:
        def take():
            check_folder(ctx)
            stack.enter_context(ctx.folder.locked())

        _on_main(ctx, take)
        yield


@contextlib.contextmanager
def tracked(ctx: Context):
    """The accelerator's trackers (``report_to``) for the block, writing into ``run_dir/logs/`` (a folder kept as a
    stage's: ``RunFolder.begin_logs``); ended when the block ends, however it ends. Inside ``working``."""
    if not ctx.accelerator.log_with:
        yield
        return
    _on_main(ctx, ctx.folder.begin_logs)
    tracking.start(ctx.accelerator, ctx.config)
    try:
        yield
    finally:
        tracking.finish(ctx.accelerator)
        if ctx.accelerator.is_main_process:
            ctx.folder.end_stage(LOGS)


def run_stage(ctx: Context, name: str) -> dict:
    """Runs stage ``name`` (again, if it was done) and marks it done; returns its summary. A stage that uses the
    reward (``eval.reward`` among its keys) checks it first (``announce_reward``)."""
    with working(ctx), tracked(ctx):
        keys = stages()[name].keys_for(ctx.config.method)
        if "eval" in keys or "eval.reward" in keys:
            announce_reward(ctx)
        return _run_stage(ctx, name)


def _run_stage(ctx: Context, name: str) -> dict:
    stage = stages()[name]
    if name not in pipeline(ctx.config.method):
        raise StageError(f"stage {name!r} is not part of method {ctx.config.method!r}, which runs "
                         f"{', '.join(pipeline(ctx.config.method))}")
    for up in needs(ctx.config, name):
        state = status(ctx, up)
        if state != "done":
            reason = "has not run" if state == "missing" else f"is stale: {_why_stale(ctx, up)}"
            raise StageError(f"stage {name!r} reads the output of stage {up!r}, which {reason}; run "
                             f"`selpo {up}` first, or `selpo run` for every stage that needs it")
    def begin():
        out = ctx.folder.begin_stage(name)
        save_config(ctx)
        (out / DONE).unlink(missing_ok=True)  # a crash from here on must not look finished

    _on_main(ctx, begin)
    ctx.accelerator.wait_for_everyone()
    ctx.print(f"== {name}: {stage.help}")
    from ..body import TALLY  # here: it brings torch, which the bookkeeping does without

    TALLY.reset()
    began = time.perf_counter()
    summary = stage.run(ctx)
    body = TALLY.totals(ctx.accelerator)
    if body["padded_tokens"]:
        summary = {**summary, **body}
    keys = stage.keys_for(ctx.config.method)
    record = {"fingerprint": fingerprint(ctx.config, name), "config": _config_values(ctx.config, keys),
              "inputs": input_hashes(ctx.config, keys), "seconds": round(time.perf_counter() - began, 1),
              "summary": summary}
    if ctx.accelerator.is_main_process:
        write_text_atomic(ctx.stage_dir(name) / DONE, json.dumps(record, indent=1))
        ctx.folder.end_stage(name)
        if name == "eval":
            tracking.log_results(ctx.accelerator, summary)
    ctx.accelerator.wait_for_everyone()
    ctx.print(f"== {name}: done in {record['seconds']} s")
    return record


def announce_reward(ctx: Context) -> None:
    """On data other than the packaged sentiment task, says which reward eval (and guidance) will use, so that
    VADER is never applied silently to data it does not fit; a reward that will not load or score fails here
    (``verify_reward``), not after training."""
    from ..rewards import VADER, describe, verify_reward

    data, spec = ctx.config.data, ctx.config.eval.reward
    verify_reward(spec)
    if data.train == "default" and data.test == "default":
        return

    hint = (" (the default; it fits only sentiment tasks: set eval.reward to a reward model folder, module:function "
            "or none for yours)" if spec == VADER else "")
    ctx.print(f"eval.reward: {describe(spec)}{hint}")


def run_all(ctx: Context) -> dict[str, dict]:
    """Runs every stage of the method that is not done, in order; returns each stage's DONE record."""
    with working(ctx), tracked(ctx):
        return _run_all(ctx)


def _run_all(ctx: Context) -> dict[str, dict]:
    announce_reward(ctx)
    records = {}
    for name in pipeline(ctx.config.method):
        state = status(ctx, name)
        if state == "done":
            ctx.print(f"== {name}: done, skipped")
            records[name] = ctx.done_record(name)
            continue
        if state == "stale":
            ctx.print(f"== {name}: redone, as {_why_stale(ctx, name)}")
        records[name] = _run_stage(ctx, name)
    return records


def save_config(ctx: Context) -> None:
    """Writes the configuration of the stage about to run to ``run_dir/config.toml`` (documented, and read
    back by later commands on the same run folder). Main process only."""
    ctx.folder.write_own_file("config.toml", config_module.to_toml(ctx.config))


def clear_stage(ctx: Context, name: str) -> None:
    """Removes a stage's outputs and checkpoints, e.g. to retrain from scratch; only files selpo wrote
    (``RunFolder.clear_stage``)."""
    with working(ctx):
        _on_main(ctx, lambda: ctx.folder.clear_stage(name))
        ctx.accelerator.wait_for_everyone()
