"""The GPD trainer: ``python -m gpd_train`` (see ``--help``) and its parts, bottom up.

- ``config``: the chains' registry and the run configuration (defaults, TOML, flags).
- ``run``: the run folder as a record (files, records, destinations, provenance) and loading
  a stage's model; checks made before any work.
- ``data``: the built-in videos and prompt-embedding sets.
- ``infer``: sampling, media and export from a run folder or a Wan folder.
- ``eval``: metrics, the learned feature space, the detail metric and the report.
- ``train``: objectives, rollout lanes, the step and loop, checkpoints, the stage pipeline.

Importing this package loads only the configuration: the sampler, the export and the
evaluation never load the trainer.
"""

from gpd_train.config.chains import CHAINS, Chain, StageId, register
from gpd_train.config.load import load_config
from gpd_train.config.settings import RunConfig
from gpd_train.errors import GPDError

__all__ = ["CHAINS", "Chain", "GPDError", "RunConfig", "StageId", "load_config", "register"]
