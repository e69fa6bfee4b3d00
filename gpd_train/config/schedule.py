"""How a chain's stages step: a schedule says each stage's student steps, its jumps on the
teacher's grid, the keys its table reads and the frozen-model forwards one update costs.
The base is halving; gpd_train.config.horizon is the other built-in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpd_train.errors import ConfigError


@dataclass(frozen=True)
class ScheduleStage:
    """Where a schedule puts a distillation stage: its student's sampling steps and, for a
    schedule of jumps on the teacher's grid, (its stage teacher's jump, its own jump)."""

    steps: int
    jumps: tuple[int, int] | None = None


class Schedule:
    """How a chain's stages step. This base is halving: stage k's student makes ``steps[k]``
    steps and learns ``steps[k-1] / steps[k]`` of its teacher's per step. A new schedule is a
    subclass (in its own module) handed to its chain's ``register(Chain(schedule=...))``.

    ``table`` is the chain's configuration table (gpd_train.config.settings.DistillConfig).
    """

    def stage_count(self, steps: list[int], table: Any) -> int:
        return len(steps) - 1

    def stage(self, steps: list[int], table: Any, stage: int) -> ScheduleStage:
        return ScheduleStage(steps[stage])

    def describe(self, section: str, steps: list[int], table: Any) -> str:
        """What sets the stage count, in messages (e.g. "steps [48, 24, 12, 6]")."""
        return f"steps {steps}"

    def check(self, section: str, chain: str, table: Any) -> None:
        """Refuse table keys this schedule does not read (each ConfigError one line)."""
        if table.horizons is not None:
            raise ConfigError(f"{section}: the {chain} chain takes no horizons (its stages follow "
                             f"steps), got horizons {table.horizons!r}")

    def check_fits(self, section: str, table: Any, steps: list[int]) -> None:
        """Refuse a table that cannot train on the teacher's ``steps`` (run before a stage of
        the chain starts, and for every chain of the pipeline)."""

    def teacher_forwards(self, plan: Any, cfg_pair: bool) -> float:
        """Frozen-model forwards per training sample and update: ``ratio`` teacher steps,
        two forwards each for a CFG pair."""
        return plan.ratio * (2 if cfg_pair else 1)

    def grid(self, plan: Any, device: Any) -> Any:
        """The stage's training grid (gpd_train.train.builders), or None: the halving StageGrid."""
        return None


HALVING = Schedule()
