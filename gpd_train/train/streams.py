"""Per-rank data streams of a training stage: one objective per stream, one loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gpd_train.config.settings import ParallelConfig
from gpd_train.errors import ConfigError
from gpd_train.parallel import owned_streams, stream_generator, world
from gpd_train.train.step import eager_loss


class StreamGroup:
    """Several data streams run by one rank; the loss is the mean over the streams.

    Every stream has the same batch, so the mean equals the loss of their concatenated
    batch, and FSDP's gradient average over ranks then gives the global-batch gradient.
    Each stream is a checkpoint part of its own (gpd_train.train.loop.stream_parts).
    """

    def __init__(self, ids: Sequence[int], generators: Sequence[torch.Generator],
                 objectives: Sequence[Any]) -> None:
        if not len(ids) == len(generators) == len(objectives) >= 1:
            raise ConfigError(f"StreamGroup needs one generator and objective per stream id, got "
                             f"{len(ids)} ids, {len(generators)} generators, "
                             f"{len(objectives)} objectives")
        self.ids = list(ids)
        self.generators = list(generators)
        self.objectives = list(objectives)

    def prepare(self, step: int) -> list[Any]:
        return [objective.prepare(step) for objective in self.objectives]

    def forward(self, inputs: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                   list[Any]]:
        """The streams' mean loss; each extra as one value per stream (logged as their
        mean, gpd_train.train.step.host_value)."""
        parts = [objective.forward(part) for objective, part in
                 zip(self.objectives, inputs, strict=True)]
        loss = torch.stack([part[0] for part in parts]).mean()
        extras = {key: torch.stack([part[1][key] for part in parts]) for key in parts[0][1]}
        return loss, extras, [part[2] for part in parts]

    def finish(self, outputs: list[Any]) -> None:
        for objective, part in zip(self.objectives, outputs, strict=True):
            objective.finish(part)

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return eager_loss(self, step)


def stream_objectives(base_generator: torch.Generator, batch_size: int,
                      config: ParallelConfig, make: Callable[[torch.Generator, int], Any]
                      ) -> tuple[Any, torch.Generator]:
    """This rank's objective (``make(generator, stream_batch)`` per owned stream) and the
    generator the trainer checkpoints. ``batch_size`` is the per-rank batch.

    One stream and one process is exactly the single-process objective.
    """
    ids = owned_streams(config)
    if batch_size % len(ids):
        raise ConfigError(f"the per-rank batch {batch_size} must be a multiple of the data "
                         f"streams per rank ({len(ids)})")
    generators = [stream_generator(base_generator, i) for i in ids]
    objectives = [make(g, batch_size // len(ids)) for g in generators]
    if len(ids) == 1 and not world().distributed:
        return objectives[0], generators[0]
    return StreamGroup(ids, generators, objectives), generators[0]
