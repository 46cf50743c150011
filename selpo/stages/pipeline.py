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
import json
import time

from .. import config as config_module
from .. import tracking
from ..config import RunConfig
from ..context import DONE, Context, mark_done
from ..input_hashes import input_hashes, input_paths
from ..run_folder import LOGS, OWN_FILES, RunFolderError
from ..stage import FIRST, LAST, Stage


class StageError(RuntimeError):
    """A stage cannot run yet: a stage it reads is missing or stale."""


def stages() -> dict[str, Stage]:
    """Every stage by name, in pipeline order: data, those the registered methods declare, train, eval, report."""
    from .. import methods  # imported when needed: the registry brings torch, which the bookkeeping does without

    return methods.stages()


def pipeline(method: str) -> tuple[str, ...]:
    """The stages ``method`` runs, in order: data, its own (``Method.stages``), train, eval, report."""
    from .. import methods

    return tuple(s.name for s in FIRST + methods.get(method).stages + LAST)


def needs(config: RunConfig, name: str) -> tuple[str, ...]:
    """The stages stage ``name`` reads under ``config``'s method: its ``needs``, or (None) every stage the method
    runs before it."""
    names = pipeline(config.method)
    declared = stages()[name].needs
    return names[:names.index(name)] if declared is None else declared


def keys(method_name: str, name: str) -> tuple[str, ...]:
    """The configuration keys stage ``name``'s result depends on under method ``method_name``: the stage's own, those
    the method adds for it (``Method.stage_keys``) and, for ``train``, the method's own section."""
    from .. import methods

    method = methods.get(method_name)
    own = (method.name,) if name == "train" and method.options is not None else ()
    return stages()[name].keys + own + tuple(method.stage_keys.get(name, ()))


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
    depends = keys(config.method, name)
    material = {"config": _config_values(config, depends), "inputs": input_hashes(config, depends),
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
    record, depends = ctx.done_record(name), keys(ctx.config.method, name)
    changed = _changed(record.get("config", {}), _config_values(ctx.config, depends))
    if changed:
        return f"its configuration changed ({', '.join(changed)})"
    edited = _changed(record.get("inputs", {}), input_hashes(ctx.config, depends))
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
    tracking.start(ctx.accelerator, ctx.config.run_dir, config_module.to_dict(ctx.config))
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
        depends = keys(ctx.config.method, name)
        if "eval" in depends or "eval.reward" in depends:
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
    depends = keys(ctx.config.method, name)
    record = {"fingerprint": fingerprint(ctx.config, name), "config": _config_values(ctx.config, depends),
              "inputs": input_hashes(ctx.config, depends), "seconds": round(time.perf_counter() - began, 1),
              "summary": summary}
    if ctx.accelerator.is_main_process:
        mark_done(ctx.stage_dir(name), record)
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
