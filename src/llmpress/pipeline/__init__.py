"""The main job: the workflow's stages run in order on one model, with a report at the end."""

from llmpress.pipeline.runner import PipelineConfig, run_pipeline

__all__ = ["PipelineConfig", "run_pipeline"]
