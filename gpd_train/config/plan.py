"""A stage's plan: what one stage of a run trains and samples, computed in one place.

From the resolved, frozen configuration (gpd_train.config.settings) and a stage id, ``stage_plan``
gives the stage's student steps, its stage teacher and that teacher's steps, the grid it
learns on (the teacher's fine steps, the shift, a horizon stage's jumps), its iterations,
the CFG scale of its teacher (or the range a w-conditioned student learns), its frequency
weight and LoRA spec, and the options its record (done.json) stores. Where a chain's stages
sit on the steps is its schedule's answer (``Chain.schedule``: halving, gpd_train.train.horizon's
jumps, ...). The trainer's builders, the run folder's records, loading, the sampler and the
export read a plan; none recomputes one.

This module imports only the configuration and the chain registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gpd_train.config.chains import CHAINS, GUIDANCE_STAGE, StageId, get_chain
from gpd_train.config.settings import LoraSpec, RunConfig
from gpd_train.errors import ConfigError


@dataclass(frozen=True)
class StagePlan:
    """One stage of a run, as its configuration makes it."""

    stage: StageId
    teacher: StageId | None  # its stage teacher (the previous stage); None for stage 0
    steps: int  # its student's sampling steps
    teacher_steps: int | None  # its stage teacher's sampling steps
    fine_steps: int  # the base teacher's steps (steps[0]): the finest grid
    shift: float
    jumps: tuple[int, int] | None  # (its teacher's jump, its own) in fine steps, or None
    iterations: int
    guidance_input: bool  # its model takes w as an input (the guidance stage and after)
    # Stage 0: the run's CFG scale; a w-conditioned stage: the [low, high] its student
    # learns; else its stage teacher's CFG scale (1 = an unguided teacher).
    guidance: float | list[float]
    freq_weight: float
    lora: LoraSpec | None  # None: full weights
    state_source: str | None  # where its rollout states start (None for stage 0)
    # A Wan2.2 pair's low expert's stage-teacher CFG scale (the high one's is ``guidance``);
    # None where w is an input or for stage 0.
    guidance_2: float | None = None

    @property
    def teacher_forwards(self) -> float:
        """Frozen-model forwards per training sample and update (its schedule's count; two
        per step where the stage teacher is a CFG pair)."""
        cfg_pair = self.stage.is_guidance or self.teacher_guidance not in (None, 1.0) \
            or self.guidance_2 not in (None, 1.0)
        return get_chain(self.stage.chain).schedule.teacher_forwards(self, cfg_pair)

    @property
    def ratio(self) -> int:
        """Teacher steps per student step on a halving grid (1 for the guidance stage)."""
        return 1 if self.teacher_steps is None else self.teacher_steps // self.steps

    @property
    def teacher_guidance(self) -> float | None:
        """The CFG scale its stage teacher samples at; None where w is an input."""
        return None if self.guidance_input else float(self.guidance)  # type: ignore[arg-type]

    def options(self) -> dict[str, Any]:
        """What shaped the stage beyond its teacher, as done.json and the output's metadata
        record it: the grid and the guidance it absorbed (or learned)."""
        options: dict[str, Any] = {"shift": self.shift, "steps": self.steps}
        if self.teacher is None:
            return {**options, "guidance": self.guidance}
        if self.jumps is not None:  # the teacher steps its student jumps, on the fine grid
            options.update(horizon=self.jumps[1], fine_steps=self.fine_steps)
        lora = {} if self.lora is None else {"lora": json.loads(self.lora.to_metadata())}
        return {**options, "teacher_steps": self.teacher_steps, "guidance": self.guidance,
                "guidance_input": self.guidance_input, "state_source": self.state_source,
                **lora}


def check_stage(config: RunConfig, sid: StageId) -> None:
    """Refuse a stage the configuration does not have, naming one that it has."""
    table = config.chain(sid.chain)
    if sid.is_guidance and not table.guidance_stage:
        declared = get_chain(sid.chain)
        having = [name for name in CHAINS if config.chain(name).guidance_stage]
        instead = (f"run `{StageId(having[0], GUIDANCE_STAGE).command()}` (the {having[0]} "
                   "chain has one)") if having else ""
        if declared.allows_guidance_stage:
            instead = (f"set {declared.section}.guidance_stage = true in the --config TOML file"
                       + (f", or {instead}" if instead else ""))
        raise ConfigError(f"the {sid.chain} chain has no guidance stage: {instead}")
    stages = config.stage_count(sid.chain)
    if not sid.is_guidance and int(sid.stage) > stages:
        raise ConfigError(f"the {sid.chain} chain has stages 0..{stages}"
                          f"{' and g' if table.guidance_stage else ''}, got stage {sid.stage}")


def check_fits(config: RunConfig, chain: str) -> None:
    """Refuse a chain whose schedule cannot train on the teacher's steps."""
    declared = get_chain(chain)
    declared.schedule.check_fits(declared.section, config.chain(chain), config.steps)


def _student_steps(config: RunConfig, sid: StageId) -> tuple[int, tuple[int, int] | None]:
    """(sampling steps, jumps) of a stage: the teacher's grid for stage 0 and the guidance
    stage, the chain's schedule for its stage k."""
    if sid.is_teacher or sid.is_guidance:
        return config.steps[0], None
    declared = get_chain(sid.chain)
    placed = declared.schedule.stage(config.steps, config.chain(sid.chain), int(sid.stage))
    return placed.steps, placed.jumps


def stage_plan(config: RunConfig, sid: StageId) -> StagePlan:
    """The plan of stage ``sid`` of the run ``config`` (refused when it has no such stage)."""
    shift, fine = config.resolved_shift, config.steps[0]
    if sid.is_teacher:
        return StagePlan(sid, None, fine, None, fine, shift, None, config.stage0.iterations,
                         False, config.resolved_guidance, 0.0, None, None)
    check_stage(config, sid)
    table = config.chain(sid.chain)
    teacher = sid.previous(table.guidance_stage)
    steps, jumps = _student_steps(config, sid)
    if sid.is_guidance:
        iterations, freq_weight = table.guidance_iterations, 0.0
    else:
        index = int(sid.stage) - 1
        iterations, freq_weight = int(table.iterations[index]), float(table.freq_weight[index])
    guidance: float | list[float]
    guidance_2 = None
    if table.guidance_stage:  # the guidance stage and the students after it take w
        guidance = [float(w) for w in table.guidance_range]
    else:
        guidance = table.stage_guidance[int(sid.stage) - 1]  # type: ignore[index]
        guidance_2 = table.stage_guidance_2[int(sid.stage) - 1]  # type: ignore[index]
    return StagePlan(sid, teacher, steps, _student_steps(config, teacher)[0], fine, shift, jumps,
                     iterations, table.guidance_stage, guidance, freq_weight, table.lora_spec(),
                     table.state_source, guidance_2)
