"""The horizon schedule: stage k's student jumps ``horizons[k-1]`` steps of the teacher's fine
grid (``steps[0]`` points) from any fine index. Its grid and its cost live here, beside the
other schedules; its objective (the target of a jump) is gpd_train.train.horizon's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gpd_model import sigma_grid
from gpd_train.config.schedule import Schedule, ScheduleStage
from gpd_train.errors import ConfigError

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

    def teacher_forwards(self, plan: Any, cfg_pair: bool) -> float:
        """The previous student's jump (the base teacher's CFG pair in stage 1), the base
        teacher's CFG steps, and on average the lane restarts' roll to their overshoot (a
        jump/N chance, (jump - 1) / 2 steps)."""
        previous_jump, jump = plan.jumps
        pair = 2 if cfg_pair else 1
        previous = pair if previous_jump == 1 else 1
        rolls = jump / plan.fine_steps * (jump - 1) / 2
        return previous + pair * (jump - previous_jump + rolls)

    def grid(self, plan: Any, device: torch.device) -> HorizonGrid:
        return HorizonGrid(plan.fine_steps, plan.shift, *plan.jumps, device)
