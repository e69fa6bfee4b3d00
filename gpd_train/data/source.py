"""What every training data set offers the trainer and the evaluation.

``draw(generator, batch_size, with_latents)`` -> ``(cond, latents or None)`` with ``cond`` a
``gpd_model.Conditioning`` of the texts [B, L, D], ``negative`` (the unconditional
Conditioning, batch 1; ``negative_context`` [L, D] its text), ``latent_shape`` (C, T, H, W),
``text_dim``, ``context_len``, ``has_latents`` and ``eval_prompts(count)`` -> ``(cond, names)``.
Two sources: the built-in procedural videos (gpd_train/data/procedural.py) and real-scale
prompt-embedding shards (gpd_train/data/embeddings.py); gpd_train/data/datasets.py opens a
run's.
"""

from __future__ import annotations

import torch

from gpd_model import Conditioning
from gpd_train.errors import ConfigError


def check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")


class DataSource:
    """The unconditional Conditioning of a data set with a ``negative_context`` [L, D]."""

    negative_context: torch.Tensor

    @property
    def negative(self) -> Conditioning:
        return Conditioning(self.negative_context[None])
