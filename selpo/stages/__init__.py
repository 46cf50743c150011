"""The pipeline as stages over one run folder; which stages run depends on the method (``PIPELINES``),
e.g. SePO's data -> oracle -> score -> train -> eval -> report."""

from .pipeline import PIPELINES, Context, Stage, StageError, clear_stage, run_all, run_stage, stages, status

__all__ = ["PIPELINES", "Context", "Stage", "StageError", "clear_stage", "run_all", "run_stage", "stages", "status"]
