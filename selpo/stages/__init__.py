"""The pipeline as stages over one run folder; which stages run depends on the method (``Method.stages`` in
``selpo.methods``), e.g. SePO's data -> oracle -> score -> train -> eval -> report."""

from .pipeline import Context, Stage, StageError, clear_stage, pipeline, run_all, run_stage, stages, status

__all__ = ["Context", "Stage", "StageError", "clear_stage", "pipeline", "run_all", "run_stage", "stages", "status"]
