"""The horizon chain: the GPD paper's recipe, as far as its public description goes.

Stage k's student jumps ``horizons[k-1]`` teacher steps at once on the teacher's fine grid
(``steps[0]`` points, 48 by default), from any fine index, not only from multiples of its
jump. Its target for a jump of h from fine index i is the frozen previous student's jump of
h' (its own horizon; the base teacher's is 1, taken with CFG) followed by h - h' Euler steps
of the base teacher T0 with CFG, at that stage's scale (annealed over the stages, from
``guidance_anneal`` or ``stage_guidance``). A jump that would pass the end of the grid stops
there (the previous student's too), so every start index has a target and the final
student, whose horizon divides the grid, samples on every h-th teacher point.

Rollout lanes live on the fine grid and move one jump per update; a lane that passes the
end restarts from fresh noise at the overshoot (rolled there by T0's CFG steps), so each
lane keeps its phase and the states cover every fine starting point.
How this reads the paper where its description is ambiguous: docs/training.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from gpd_model import CFG, Conditioning, Denoiser, DiTDenoiser
from gpd_train.config.horizon import HorizonGrid
from gpd_train.devices import autocast
from gpd_train.train.lanes import LaneBatch
from gpd_train.train.objectives import (
    DistillSetup,
    OnlineDistillation,
    euler_path,
    online_arguments,
    velocity_between,
)


@torch.no_grad()
def horizon_target(previous: Denoiser, base: Denoiser, x: torch.Tensor,
                   cond: Conditioning, grid: HorizonGrid, index: torch.Tensor) -> torch.Tensor:
    """The velocity that takes ``x`` at fine indices ``index`` [B] where the previous
    student's jump and then the base teacher's CFG steps go (each stopping at the end)."""
    sigma = grid.student
    middle = grid.ahead(index, grid.previous_jump)
    end = grid.ahead(index, grid.jump)
    x_middle = euler_path(previous, x, cond, sigma[torch.stack([index, middle])])
    offsets = torch.arange(grid.jump - grid.previous_jump + 1, device=index.device)
    path = torch.minimum(middle[None, :] + offsets[:, None], end[None, :])
    x_end = euler_path(base, x_middle, cond, sigma[path])
    return velocity_between(x, x_end, sigma[index], sigma[end])


class HorizonDistillation(OnlineDistillation):
    """Online distillation on a ``HorizonGrid``: ``teacher`` is the previous stage's model,
    ``base`` the stage-0 teacher that makes the extra fine steps (and rolls lanes)."""

    def __init__(self, *, base: Denoiser, **kwargs: Any) -> None:
        self.base = base
        super().__init__(**kwargs)

    def _target(self, batch: LaneBatch) -> torch.Tensor:
        return horizon_target(self.teacher, self.base, batch.x, batch.cond, self.grid,
                              batch.index)

    @torch.no_grad()
    def _rollout_step(self, batch: LaneBatch) -> torch.Tensor:
        """One fine step of the base teacher (a lane's grid point is a fine index)."""
        path = self.grid.student[torch.stack([batch.index, self.grid.ahead(batch.index, 1)])]
        with autocast(self.device, self.precision):
            return euler_path(self.base, batch.x, batch.cond, path)


def horizon_distillation(setup: DistillSetup, generator: torch.Generator,
                         batch_size: int) -> HorizonDistillation:
    """The horizon chain's objective. ``setup.teacher`` is the previous stage as the builder
    makes it: a CFG pair at the stage's scale when it is stage 0, which is how the base
    teacher's one-step jump is taken; a previous student jumps unguided (it absorbed CFG).
    The base teacher runs as a CFG pair exactly when the stage teacher does."""
    grid, teacher = setup.grid, setup.teacher
    guided = isinstance(teacher, CFG)
    previous = teacher if grid.previous_jump == 1 or not guided else teacher.denoiser
    base = DiTDenoiser(setup.base)
    if guided:
        base = dataclasses.replace(teacher, denoiser=base)
    return HorizonDistillation(base=base, **online_arguments(setup, generator, batch_size,
                                                             teacher=previous))
