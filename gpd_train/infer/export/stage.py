"""What every export format reads of the exported stage: its sampling grid and CFG scale,
and the student as a plain Wan2.1 transformer."""

from __future__ import annotations

from typing import Any

import torch

from gpd_model import WanDiT, fold_guidance, has_guidance_input
from gpd_train.config.chains import StageId
from gpd_train.config.plan import StagePlan
from gpd_train.errors import SampleError
from gpd_train.run.loading import recorded_grid
from gpd_train.run.lora import GUIDANCE_PREFIX


def plain_student(model: WanDiT, guidance: float | None = None) -> WanDiT:
    """The one place a student becomes a plain Wan2.1 transformer, for every format: a
    student with a guidance input is folded at ``guidance`` (the w the exported model
    samples at)."""
    if not has_guidance_input(model):
        return model
    if guidance is None:
        raise SampleError("this student takes the CFG scale as an input: say which w to "
                          "export it at (--guidance W)")
    return fold_guidance(model, guidance)


def student_grid(record: dict[str, Any] | None, plan: StagePlan) -> tuple[int, float]:
    """(steps, shift) the exported stage samples on: the stage's own (done.json), else its
    plan's (a record from before options were kept)."""
    steps, shift = recorded_grid(record)
    return steps or plan.steps, shift or plan.shift


def sampling_guidance(record: dict[str, Any] | None, plan: StagePlan) -> float:
    """The ``guidance_scale`` the exported stage samples at: the teacher's CFG scale for
    stage 0 (its done.json's, else its plan's), none (1.0) for a distilled student."""
    if not plan.stage.is_teacher:
        return 1.0
    recorded = ((record or {}).get("options") or {}).get("guidance")
    return float(recorded if recorded is not None else plan.guidance)  # type: ignore[arg-type]


def refuse_guided_lora(sid: StageId, adapter: dict[str, torch.Tensor], what: str,
                       instead: str) -> None:
    """A LoRA file cannot carry a guidance input: name the merged export instead."""
    if any(key.startswith(GUIDANCE_PREFIX) for key in adapter):
        raise SampleError(f"{sid} takes the CFG scale as an input, which {what} cannot carry: "
                          f"export it merged at a CFG scale with {instead}")
