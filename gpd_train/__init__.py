"""The GPD trainer: stages, online targets, data, checkpoints and evaluation.

Entry point: ``python -m gpd_train`` (see ``--help``).
"""

from .config import RunConfig, load_config
from .data import ProceduralVideos, PromptEmbeddingSet
from .evaluate import evaluate_run
from .pipeline import MissingStageError, Run, run_pipeline, run_stage

__all__ = [
    "MissingStageError",
    "ProceduralVideos",
    "PromptEmbeddingSet",
    "Run",
    "RunConfig",
    "evaluate_run",
    "load_config",
    "run_pipeline",
    "run_stage",
]
