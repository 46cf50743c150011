"""The SePO pipeline as stages over one run folder: data -> oracle -> score -> train -> eval -> report."""

from .pipeline import Context, Stage, StageError, clear_stage, run_all, run_stage, stages, status

__all__ = ["Context", "Stage", "StageError", "clear_stage", "run_all", "run_stage", "stages", "status"]
