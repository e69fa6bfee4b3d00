"""A run's data set: the built-in procedural videos, or prompt-embedding shards at a path."""

from __future__ import annotations

from pathlib import Path

from gpd_model import DiTConfig
from gpd_train.config.settings import check_task
from gpd_train.data.embeddings import PromptEmbeddingSet
from gpd_train.data.procedural import ProceduralVideos
from gpd_train.errors import ConfigError


def open_data(path: str | Path | None, cfg: DiTConfig, seed: int,
              task: str = "t2v") -> ProceduralVideos | PromptEmbeddingSet:
    """The built-in set when ``path`` is None, else the prompt-embedding set at ``path``,
    for ``task`` (text- or image-to-video), which must be the model's."""
    check_task(task, cfg)
    if path is None:
        # The video; Wan2.1-style i2v: + the mask and first frame (TI2V replaces frames).
        first_frames = task == "i2v" and not cfg.image_to_video
        channels = 3 + (1 + 3 if task == "i2v" and not first_frames else 0)
        if (cfg.in_channels, cfg.out_channels) != (channels, 3):
            raise ConfigError(f"the built-in data set is RGB video: a model for {task} on it has "
                             f"in_channels {channels} and out_channels 3, got "
                             f"{cfg.in_channels} and {cfg.out_channels}: pass --data with a "
                             "prompt-embedding data set")
        return ProceduralVideos(cfg.text_dim, seed=seed, task=task, image_dim=cfg.image_dim,
                                first_frames=first_frames)
    data = PromptEmbeddingSet(path, text_dim=cfg.text_dim, latent_channels=cfg.out_channels)
    data.check_condition(cfg, task)
    return data
