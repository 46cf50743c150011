"""Metrics to experiment trackers (``report_to``: TensorBoard, W&B, ... through Accelerate's trackers).

The run folder stays the record (each training's ``metrics.jsonl``, eval's ``results.json``); the trackers
receive the same values as they are written: every logged training step under the training's folder in the run
folder (``oracle/loss``, ``train/loss``, guidance's retraining rounds as ``train/rewards/round-1/loss``), and
eval's results once as scalars ``eval/<model>/<metric>`` and as a table. They write into ``run_dir/logs/``,
from the main process only; the pipeline starts them for a run folder and ends them when its command ends
(``selpo.stages.pipeline.tracked``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .run_folder import LOGS

NONE = "none"
PROJECT = "selpo"  # the trackers' project name: TensorBoard's events go to run_dir/logs/selpo/


def _known() -> tuple[list[str], list[str]]:
    """(every tracker name Accelerate takes, those whose package is installed)."""
    from accelerate.tracking import get_available_trackers  # here: it brings torch, which `selpo --help` avoids
    from accelerate.utils import LoggerType

    return [str(t.value) for t in LoggerType], [str(t.value) for t in get_available_trackers()]


def tracker_names(spec: str) -> list[str]:
    """The trackers a ``report_to`` value names (comma-separated; "none": none; "all": every installed one)."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if names == [NONE]:
        return []
    return _known()[1] if names == ["all"] else names


def report_to_error(spec: str) -> str | None:
    """What is wrong with a ``report_to`` value (unknown name, package not installed), or None."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    known, installed = _known()
    if not names or (NONE in names and len(names) > 1):
        return f"takes 'none' or tracker names separated by commas ({', '.join(known)}), got {spec!r}"
    unknown = [name for name in names if name not in known + [NONE]]
    if unknown:
        return f"names unknown tracker(s) {', '.join(unknown)}; Accelerate's trackers are {', '.join(known)}"
    if names == ["all"] and not installed:
        return "is 'all', but no tracker is installed: pip install tensorboard (or wandb, ...)"
    missing = [name for name in names if name not in installed + [NONE, "all"]]
    if missing:
        return (f"names {', '.join(missing)}, whose package is not installed: pip install "
                f"{' '.join(missing)}")
    return None


def logging_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOGS


def hyperparameters(settings: dict) -> dict:
    """The configuration (``selpo.config.to_dict``'s nested values) as flat ``section.key`` values, the trackers'
    record of the run's settings (unset ones, None, are not in it)."""
    flat = {}
    for name, value in settings.items():
        table = value if isinstance(value, dict) else {"": value}
        flat.update({f"{name}.{key}" if key else name: v for key, v in table.items()})
    return flat


def start(accelerator, run_dir: str, settings: dict) -> None:
    """Starts the accelerator's trackers (``make_accelerator`` gave it ``report_to``'s) for the run in ``run_dir``
    with ``settings`` (its configuration, ``hyperparameters``), writing into the run folder's ``logs/``. W&B runs
    offline (``WANDB_MODE=offline`` unless set): nothing is uploaded."""
    logs = logging_dir(run_dir)
    accelerator.project_configuration.logging_dir = str(logs)  # compare: one accelerator, a folder per run
    if "wandb" in (str(t) for t in accelerator.log_with):
        os.environ.setdefault("WANDB_MODE", "offline")
    accelerator.init_trackers(PROJECT, config=hyperparameters(settings), init_kwargs={"wandb": {"dir": str(logs)}})


def finish(accelerator) -> None:
    """Ends the trackers ``start`` began (what ``Accelerator.end_training`` does to them, without ending the
    process group, which ``selpo compare``'s next run and a notebook's next call still use)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def _tag(accelerator, out_dir: Path) -> str:
    """A training's name in the trackers: its folder relative to the run folder (``oracle``,
    ``train/rewards/round-1``), or the folder's own name when it lies elsewhere."""
    run_dir = Path(accelerator.logging_dir).parent
    return out_dir.relative_to(run_dir).as_posix() if out_dir.is_relative_to(run_dir) else out_dir.name


def _numbers(values: dict, prefix: str) -> dict[str, float]:
    """The numeric leaves of nested ``values`` as ``prefix/key/...`` (None, strings and booleans left out)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = value
    return flat


def log_step(accelerator, out_dir: Path, record: dict) -> None:
    """One ``metrics.jsonl`` record of the training in ``out_dir``, at its step. W&B wants one rising step per
    run, which the trainings of a run do not share: there each training is plotted against its own
    ``<tag>/step``."""
    if not accelerator.trackers:
        return
    tag = _tag(accelerator, out_dir)
    values = _numbers(record, tag)
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.tracker.define_metric(f"{tag}/*", step_metric=f"{tag}/step")
            tracker.log(values)
        else:
            tracker.log(values, step=record["step"])


def results_table(results: dict) -> list[list]:
    """Eval's numbers as [metric, initial, policy] rows: the two models' metrics side by side, then the other
    numbers (the oracle's accuracy, the win rate, the counts) in the policy's column."""
    initial, policy = results.get("initial", {}), results.get("policy", {})
    rows = [[metric, initial.get(metric), policy.get(metric)] for metric in dict.fromkeys([*initial, *policy])]
    others = _numbers({k: v for k, v in results.items() if k not in ("initial", "policy")}, "eval")
    return rows + [[key.removeprefix("eval/"), None, value] for key, value in others.items()]


def log_results(accelerator, results: dict) -> None:
    """Eval's results: every number as ``eval/<model>/<metric>`` (``eval/policy/reward``, ``eval/win_rate/rate``,
    ...), and ``results_table`` as a table where the tracker takes one (W&B) and as Markdown text elsewhere."""
    if not accelerator.trackers:
        return
    accelerator.log(_numbers(results, "eval"))
    rows = results_table(results)
    columns = ["metric", "initial", "policy"]
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_table("eval/results", columns=columns, data=rows)
        else:
            cells = [[str(c) if isinstance(c, str) else "-" if c is None else f"{c:.4g}" for c in row] for row in rows]
            tracker.log({"eval/results": "\n".join("| " + " | ".join(row) + " |"
                                                   for row in [columns, ["---"] * 3, *cells])})
