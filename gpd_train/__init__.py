"""The GPD trainer: stages, online targets, data, checkpoints and evaluation.

Entry point: ``python -m gpd_train`` (see ``--help``). The parts, bottom up:
``chains`` (the chains and stage ids), ``config``, ``stages`` (the run folder's one
reader), ``builders`` (each stage's trainer), ``pipeline`` (the order of stages),
``evaluate``, ``loading`` / ``sample`` / ``export`` (inference, apart from training).
"""

from .builders import TrainingRun
from .chains import CHAINS, Chain, StageId, register
from .config import RunConfig, load_config
from .data import ProceduralVideos, PromptEmbeddingSet
from .errors import GPDError
from .evaluate import evaluate_run
from .pipeline import run_pipeline, run_stage
from .stages import MissingStageError, RunFolder

__all__ = [
    "CHAINS",
    "Chain",
    "GPDError",
    "MissingStageError",
    "ProceduralVideos",
    "PromptEmbeddingSet",
    "RunConfig",
    "RunFolder",
    "StageId",
    "TrainingRun",
    "evaluate_run",
    "load_config",
    "register",
    "run_pipeline",
    "run_stage",
]
