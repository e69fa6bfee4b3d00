"""The stage output of a (possibly sharded) trainer: gathered, exported for diffusers.

Under torchrun the EMA is sharded; it is gathered tensor by tensor to rank 0, which
writes the trainer's ``model.safetensors`` (what the next stage and the sampler read) and
a diffusers folder (``diffusers/``: diffusion_pytorch_model.safetensors + config.json).
Checkpoints, sharded or not, are gpd_train.checkpoint's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpd_model import (
    DiTConfig,
    WanDiT,
    add_guidance_input,
    fold_guidance,
    has_guidance_input,
    save_diffusers,
)

from . import parallel

if TYPE_CHECKING:  # the pipeline imports this module lazily
    from .pipeline import Run

DIFFUSERS_FOLDER = "diffusers"


def export_diffusers(cfg: DiTConfig, weights: dict[str, torch.Tensor], folder: Path,
                     guidance: float) -> Path:
    """Write ``weights`` (our key layout, full tensors) as a diffusers model folder; a
    guidance input is folded at ``guidance``, the CFG scale the exported model samples at."""
    with torch.device("meta"):
        model = WanDiT(cfg)
        if any(key.startswith("guidance_embedding.") for key in weights):
            add_guidance_input(model)
    model.load_state_dict(weights, strict=True, assign=True)
    if has_guidance_input(model):
        model = fold_guidance(model, guidance)
    return save_diffusers(model, folder)


def _write_stage_output(run: Run, chain: str, stage: int, weights: dict[str, torch.Tensor],
                        summary: dict[str, Any]) -> Path:
    if run.lora_spec(chain, stage) is None:  # an adapter is exported by gpd_train.export
        export_diffusers(run.dit_config, weights,
                         run.stage_folder(chain, stage) / DIFFUSERS_FOLDER,
                         run.config.resolved_guidance)
    return run.finish_stage(chain, stage, weights, summary)  # done.json last


def finish_stage(run: Run, chain: str, stage: int, ema_state: dict[str, torch.Tensor],
                 summary: dict[str, Any]) -> Path:
    """The stage output from the (possibly sharded) EMA: ``run.finish_stage`` in one
    process; under torchrun gathered to rank 0, which also writes the diffusers folder
    (full-weight stages)."""
    if not parallel.world().distributed:
        return run.finish_stage(chain, stage, ema_state, summary)
    gathered = {}
    for key, value in ema_state.items():  # one tensor at a time: peak = one full tensor
        full = parallel.full_value(value).detach()
        if parallel.is_main():
            gathered[key] = full.cpu()
    return parallel.main_only(_write_stage_output, run, chain, stage, gathered, summary)
