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
from dataclasses import dataclass
from typing import Any

import torch

from gpd_model import CFG, Conditioning, Denoiser, DiTDenoiser, sigma_grid

from .chains import Chain, Schedule, ScheduleStage, register
from .errors import ConfigError
from .lanes import LaneBatch
from .loop import autocast
from .objectives import (
    DistillSetup,
    OnlineDistillation,
    euler_path,
    online_arguments,
    velocity_between,
)

HORIZON_CHAIN = "horizon"


@dataclass
class HorizonGrid:
    """The teacher's fine grid of ``fine_steps`` steps, a student that jumps ``jump`` of them
    and its stage teacher that jumps ``previous_jump``."""

    fine_steps: int
    shift: float
    previous_jump: int
    jump: int
    device: torch.device

    def __post_init__(self) -> None:
        if not 1 <= self.previous_jump < self.jump:
            raise ValueError(f"a horizon stage jumps further than its teacher: got "
                             f"{self.previous_jump} -> {self.jump} teacher steps")
        # Lanes index the fine grid, so the objective's student inputs read these sigmas.
        self.student = sigma_grid(self.fine_steps, self.shift).float().to(self.device)

    @property
    def steps(self) -> int:
        """The lanes' grid points: every fine index."""
        return self.fine_steps

    @property
    def lane_stride(self) -> int:
        return self.jump

    def ahead(self, index: torch.Tensor, jump: int) -> torch.Tensor:
        """The fine index ``jump`` steps after ``index``, stopping at the grid's end."""
        return (index + jump).clamp(max=self.fine_steps)

    def next_sigma(self, index: torch.Tensor) -> torch.Tensor:
        return self.student[self.ahead(index, self.jump)]


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


def horizon_evaluations(grid: HorizonGrid, cfg_pair: bool) -> float:
    """Frozen-model forwards per training sample and update: the previous student's jump
    (the base teacher's CFG pair in stage 1), the base teacher's CFG steps, and on average
    the lane restarts' roll to their overshoot (a jump/N chance, (jump - 1) / 2 steps)."""
    pair = 2 if cfg_pair else 1
    previous = pair if grid.previous_jump == 1 else 1
    rolls = grid.jump / grid.fine_steps * (grid.jump - 1) / 2
    return previous + pair * (grid.jump - grid.previous_jump + rolls)


class HorizonSchedule(Schedule):
    """Stage k's student jumps ``horizons[k-1]`` of the teacher's ``steps[0]`` steps, so it
    samples in ``ceil(steps[0] / horizons[k-1])`` steps; its stage teacher jumps the horizon
    before (the base teacher's is 1)."""

    def stage_count(self, steps: list[int], table: Any) -> int:
        return len(table.horizons)

    def stage(self, steps: list[int], table: Any, stage: int) -> ScheduleStage:
        horizons = table.horizons
        jump = horizons[stage - 1]
        return ScheduleStage(-(-steps[0] // jump), (1 if stage == 1 else horizons[stage - 2], jump))

    def describe(self, section: str, steps: list[int], table: Any) -> str:
        return f"{section}.horizons {table.horizons}"

    def check(self, section: str, chain: str, table: Any) -> None:
        """Increasing jumps from 2 teacher steps, and full weights."""
        horizons = table.horizons
        if horizons is None or (isinstance(horizons, list) and not horizons):
            raise ConfigError(f"{section}.horizons needs at least one stage's jump: the {chain} "
                             "chain takes horizons = [2, 3, ...] (teacher steps per student step, "
                             f"stage by stage), got {horizons!r}")
        if (not isinstance(horizons, list)
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in horizons)
                or any(b <= a for a, b in zip(horizons, horizons[1:], strict=False))):
            raise ConfigError(f"{section}.horizons must be increasing ints >= 2 (teacher steps per "
                             f"student step), got {horizons!r}")
        if table.lora_rank:
            raise ConfigError(f"{section}.lora_rank must be 0: the {chain} chain trains full "
                             "weights (its targets query two frozen models)")

    def check_fits(self, section: str, table: Any, steps: list[int]) -> None:
        """The last jump divides the teacher's steps (its student samples on every k-th
        teacher point; a shorter last step is not supported)."""
        last, fine = table.horizons[-1], steps[0]
        if last > fine or fine % last:
            fits = [k for k in range(2, fine + 1) if fine % k == 0]
            raise ConfigError(f"{section}.horizons ends at {last}, which does not divide the "
                             f"teacher's {fine} steps (steps[0]): its student would need a "
                             f"shorter last step; end at one of {fits}")

    def grid(self, plan: Any, device: torch.device) -> HorizonGrid:
        return HorizonGrid(plan.fine_steps, plan.shift, *plan.jumps, device)


register(Chain(
    name=HORIZON_CHAIN, section="horizon", label="GPD-horizon", folder="horizon",
    seed_offset=300,
    summary="the GPD paper's recipe: stage k jumps horizons[k-1] teacher steps, learning the "
            "previous student's jump plus T0's CFG steps at an annealed scale",
    defaults={"horizons": [2, 3, 4, 5, 6, 7, 8], "iterations": [700] * 7,
              "freq_weight": [0.0] * 6 + [1.0]},
    evaluate_every_stage=False, allows_guidance_stage=False, objective=horizon_distillation,
    schedule=HorizonSchedule()))
