"""The ``comfyui`` export format: one safetensors file in Wan's original key layout, as
ComfyUI shares models (``<out>/<out's name>.safetensors``; no ``--base``).

A full stage (a guidance input folded at ``--guidance``, as for diffusers) or a LoRA stage
with ``--merged`` is written for ComfyUI's ``models/diffusion_models/``; a LoRA stage as a
LoRA for ``models/loras/`` (``diffusion_model.<module>.lora_down``/``lora_up``/``alpha``,
which diffusers' ``load_lora_weights`` reads too), applied to the run's stage 0.

A stage of a Wan2.2 run (an expert pair) is written as one file per expert, as ComfyUI
shares Wan2.2: ``<name>_high_noise.safetensors`` and ``<name>_low_noise.safetensors``; a
LoRA stage of one as one LoRA per expert under the same names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gpd_model import has_guidance_input
from gpd_model.checkpoint import export_state_dict
from gpd_train.config.chains import DEFAULT_CHAIN
from gpd_train.config.settings import LoraSpec
from gpd_train.errors import ConfigError
from gpd_train.infer.export import MERGED, ExportFormat, ExportRequest
from gpd_train.infer.export.stage import (
    plain_student,
    refuse_guided_lora,
    sampling_guidance,
    student_grid,
)
from gpd_train.run.destination import EXPORT, staged_output
from gpd_train.run.experts import EXPERTS, split_experts
from gpd_train.run.folder import TEACHER
from gpd_train.run.loading import run_stage_of
from gpd_train.run.lora import split_lora
from gpd_train.run.records import OUTPUT

NAME = "comfyui"
LORA_PREFIX = "diffusion_model."  # the diffusion model's keys in a ComfyUI LoRA


def comfyui_lora_state(adapter: dict[str, torch.Tensor], spec: LoraSpec,
                       num_layers: int) -> dict[str, torch.Tensor]:
    """``adapter`` in the LoRA layout of Wan's original keys that ComfyUI's LoRA loader and
    diffusers' non-diffusers Wan converter both read: ``diffusion_model.<wan module>.``
    ``lora_down.weight`` (A), ``lora_up.weight`` (B) and ``alpha`` (the loaders scale by
    alpha / R, as we do)."""
    tensors: dict[str, torch.Tensor] = {}
    for part, (down, up) in split_lora(adapter, num_layers, "wan").items():
        prefix = f"{LORA_PREFIX}{part}"
        tensors[f"{prefix}.lora_down.weight"] = down
        tensors[f"{prefix}.lora_up.weight"] = up
        tensors[f"{prefix}.alpha"] = torch.tensor(float(spec.alpha))
    return tensors


def comfyui_file(out: str | Path, expert: str | None = None) -> str:
    """The ComfyUI export's weights file, named after ``--out`` (the name ComfyUI lists);
    ``expert``: the file of that expert of a pair."""
    suffix = "" if expert is None else f"_{expert}_noise"
    return f"{Path(out).resolve().name}{suffix}.safetensors"


def export_comfyui(run_dir: str | Path, out: str | Path, *, chain: str = DEFAULT_CHAIN,
                   stage: int | None = None, guidance: float | None = None,
                   merged: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write a run's stage into the folder ``out`` as one safetensors file in Wan's original
    key layout (``comfyui_file``), as ComfyUI shares models: a diffusion model (full weights,
    a guidance input folded at ``guidance``, default the run's CFG; for ComfyUI's
    models/diffusion_models/) or, for a LoRA stage unless ``merged``, a LoRA (models/loras/,
    applied to stage 0 of the run, the base). Returns what was exported."""
    run, sid = run_stage_of(Path(run_dir), chain, stage)
    found = None if merged else run.stage_adapter(sid, check_grid=False)
    plan = run.plan(sid)
    steps, shift = student_grid(run.record(sid), plan)
    record: dict[str, Any] = {
        "run": str(Path(run_dir).resolve()), "stage": sid.name, "format": NAME,
        "file": comfyui_file(out), "steps": steps, "shift": shift,
        "guidance_scale": sampling_guidance(run.record(sid), plan)}
    if found is not None:
        spec, adapter = found
        refuse_guided_lora(sid, adapter, "a ComfyUI LoRA",
                            "--format comfyui --merged [--guidance W]")
        adapters = {record["file"]: adapter}
        if run.is_pair:  # one LoRA per expert, each applied to its expert of stage 0
            adapters = dict(zip((comfyui_file(out, name) for name in EXPERTS),
                                split_experts(adapter, run.stage_folder(sid) / OUTPUT),
                                strict=True))
            record.update(file=list(adapters), boundary=run.boundary)
        files = {name: comfyui_lora_state(part, spec, run.dit_config.num_layers)
                 for name, part in adapters.items()}
        record.update(comfyui_folder="models/loras", base=TEACHER.name,
                      lora={"rank": spec.rank, "alpha": spec.alpha,
                            "targets": list(spec.targets)})
    else:
        folded_at = run.config.resolved_guidance if guidance is None else guidance
        if run.is_pair:  # one file per expert
            models = dict(zip((comfyui_file(out, name) for name in EXPERTS),
                              run.load_stage_experts(sid, check_grid=False), strict=True))
            record.update(file=list(models), boundary=run.boundary)
        else:
            models = {record["file"]: run.load_stage_model(sid, check_grid=False)}
        models = {name: model.float() for name, model in models.items()}
        guided = has_guidance_input(next(iter(models.values())))
        record.update(comfyui_folder="models/diffusion_models",
                      student_guidance=folded_at if guided else None)
        files = {name: export_state_dict(plain_student(model, folded_at), "wan")
                 for name, model in models.items()}
    with staged_output(out, EXPORT, overwrite=overwrite) as staging:
        for name, tensors in files.items():
            save_file(tensors, str(staging / name),
                      metadata={"format": "pt", "gpd_export": json.dumps(record)})
        (staging / "gpd_export.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def comfyui_usage(record: dict[str, Any], out: str | Path) -> str:
    """What to do with a ComfyUI export: where the file goes and how to sample it."""
    path = Path(out) / record["file"] if isinstance(record["file"], str) else " and ".join(
        str(Path(out) / name) for name in record["file"])
    if "lora" in record:
        each = " each to its expert of" if "boundary" in record else ""
        where = (f"a LoRA of {record['stage']}: put {path} in ComfyUI/{record['comfyui_folder']}/"
                 f" and apply it (LoraLoaderModelOnly, strength 1.0){each} the run's "
                 f"{record['base']} (export it with --format comfyui --stage 0)")
    elif "boundary" in record:
        where = (f"{record['stage']}, a Wan2.2 pair: put {path} in "
                 f"ComfyUI/{record['comfyui_folder']}/ (Load Diffusion Model each); the high-"
                 f"noise file samples the steps whose sigma >= {record['boundary']:g}, the "
                 "low-noise one the rest (two KSamplerAdvanced, as Wan2.2's workflows)")
    else:
        where = (f"{record['stage']}: put {path} in ComfyUI/{record['comfyui_folder']}/ "
                 "(Load Diffusion Model)")
    return (f"exported {where}; sample with ModelSamplingSD3 shift {record['shift']:g}, "
            f"KSampler steps {record['steps']}, cfg {record['guidance_scale']:g}, "
            "scheduler simple")


def check(request: ExportRequest) -> None:
    """Refuse what a single weights file would not read: --copy and --base."""
    if request.copy:
        raise ConfigError("--copy copies the base's text_encoder/, tokenizer/ and vae/ into a "
                          "Diffusers folder; --format comfyui writes one weights file: drop --copy")
    if request.base is not None:
        raise ConfigError(f"--base {request.base}: --format comfyui writes the run's weights "
                          "alone (ComfyUI loads its own text encoder and VAE; a LoRA applies to "
                          "the run's stage 0), so nothing of --base is read: drop --base")


def write(request: ExportRequest, kind: str) -> str:
    """Write ``request``'s stage as ``kind``; returns where the file goes and how to sample."""
    record = export_comfyui(request.run, request.out, chain=request.chain, stage=request.stage,
                            guidance=request.guidance, merged=kind == MERGED,
                            overwrite=request.overwrite)
    return comfyui_usage(record, request.out)


FORMAT = ExportFormat(
    name=NAME, write=write, check=check,
    help="comfyui: one safetensors file in Wan's original keys, a model for ComfyUI's "
         "models/diffusion_models/ or a LoRA stage for models/loras/ (no --base needed)")
