"""The ``diffusers`` export format: a Diffusers folder that diffusers' WanPipeline runs, or a
LoRA stage as a diffusers Wan LoRA.

A full stage (``--base`` needed) or a LoRA stage with ``--merged`` is written as a whole
pipeline folder: the base's ``text_encoder/``, ``tokenizer/`` and ``vae/`` (symbolic links by
default, ``--copy`` for copies; an image-to-video base's ``image_encoder/`` and
``image_processor/`` too, where it has them, and its WanImageToVideoPipeline
model_index.json), the student as ``transformer/`` and a
FlowMatchEulerDiscreteScheduler whose grid at the student's step count is our
``gpd_model.sigma_grid(steps, shift)`` (see ``student_scheduler_config``)::

    pipe = WanPipeline.from_pretrained("student/")
    video = pipe(prompt, num_inference_steps=6, guidance_scale=1.0).frames[0]

A Wan2.2-TI2V student keeps ``expand_timesteps`` in model_index.json, so diffusers'
WanImageToVideoPipeline.from_pretrained("student/") runs its image-to-video as well.

A stage of a Wan2.2 run (an expert pair) is written as Wan2.2's pipeline folder: the high-noise
expert as ``transformer/``, the low-noise one as ``transformer_2/``, the boundary sigma as
``boundary_ratio`` in model_index.json (WanPipeline switches at timestep 1000 x boundary_ratio,
our sigma boundary).

A LoRA stage is written as ``student/pytorch_lora_weights.safetensors`` and
``student/scheduler/`` (no ``--base``)::

    pipe = WanPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")
    pipe.load_lora_weights("student/")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("student/",
                                                                     subfolder="scheduler")

A LoRA stage of a Wan2.2 run writes one adapter per expert, each into its transformer of
the Wan2.2 base (``PAIR_LORA_WEIGHT_NAMES``)::

    pipe.load_lora_weights("student/", weight_name="pytorch_lora_weights_high_noise.safetensors")
    pipe.load_lora_weights("student/", weight_name="pytorch_lora_weights_low_noise.safetensors",
                           load_into_transformer_2=True)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from gpd_model import DiTConfig, WanDiT, has_guidance_input, save_diffusers
from gpd_train.config.chains import DEFAULT_CHAIN
from gpd_train.config.settings import LoraSpec
from gpd_train.errors import ConfigError, SampleError
from gpd_train.infer.export import FULL, LORA, MERGED, ExportFormat, ExportRequest
from gpd_train.infer.export.stage import (
    plain_student,
    refuse_guided_lora,
    sampling_guidance,
    student_grid,
)
from gpd_train.run.destination import EXPORT, check_export_destination, staged_output
from gpd_train.run.experts import EXPERTS, split_experts
from gpd_train.run.loading import load_model, run_stage_of
from gpd_train.run.lora import split_lora
from gpd_train.run.records import OUTPUT
from gpd_train.run.wan_folder import WanFolderError, component
from gpd_train.run.writes import copy_error

LINKED = ("text_encoder", "tokenizer", "vae")
IMAGE_LINKED = ("image_encoder", "image_processor")  # Wan2.1-I2V's CLIP, where the base has it
# The pipelines a base folder may be (model_index.json's _class_name) and the student each runs.
PIPELINES = {"WanPipeline": "t2v", "WanImageToVideoPipeline": "i2v"}
NUM_TRAIN_TIMESTEPS = 1000  # Wan's: the DiT's timestep input is 1000 * sigma
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# A pair's adapters, one file per expert (the high one loads into ``transformer``, the low
# one with ``load_into_transformer_2=True``), named as the ComfyUI export names its files.
PAIR_LORA_WEIGHT_NAMES = {name: f"pytorch_lora_weights_{name}_noise.safetensors"
                          for name in EXPERTS}


def student_scheduler_config(steps: int, shift: float,
                             num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> dict[str, Any]:
    """A FlowMatchEulerDiscreteScheduler config whose ``set_timesteps(steps)`` grid is ours.

    Ours: ``S(t)`` at ``t = 1 - i/K`` (``S`` the shift by ``shift``), then 0. diffusers'
    (0.33-0.42): unshifted points ``linspace(1, m, K)`` with ``m = S'(1/N)``, shifted by its
    ``shift`` s', then, with ``shift_terminal``, ``1 - sigma`` scaled so the last point is
    ``shift_terminal``; then 0. With ``shift = s`` alone the grids differ (6 steps at shift 5:
    0.56 where ours has 0.71). Both ``1 - sigma_i`` are of the form ``a i / (b - c i)``: they
    agree when their poles agree, which is a quadratic in s' (its smaller root is taken), and
    ``shift_terminal = S(1/K)``, our last nonzero sigma. The grids then agree to float32
    rounding (tests/test_real_scale.py checks 1e-6). For other step counts the scheduler gives
    its own grid, not ours.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"shift must be finite and > 0, got {shift!r}")
    config: dict[str, Any] = {"num_train_timesteps": num_train_timesteps, "shift": 1.0,
                              "use_dynamic_shifting": False, "shift_terminal": None,
                              "invert_sigmas": False, "stochastic_sampling": False}
    if steps == 1:  # one step from 1 to 0: diffusers' grid is [1, 0] at any shift
        return config
    n = num_train_timesteps
    pole = (shift - 1) / (shift * steps)  # our 1 - sigma_i has its pole at i = 1 / pole
    r = pole * (steps - 1) / (n - 1)
    b = 1 - r * (n - 1)
    discriminant = b * b - 4 * r
    if discriminant < 0:
        raise ConfigError(f"no FlowMatchEulerDiscreteScheduler config reproduces {steps} steps at "
                         f"shift {shift} with {n} train timesteps")
    config["shift"] = 2 / (b + math.sqrt(discriminant))  # the smaller root, stable form
    t_last = 1.0 / steps
    config["shift_terminal"] = shift * t_last / (shift * t_last + 1 - t_last)
    return config


def export_transformer(model: WanDiT, folder: str | Path, guidance: float | None = None) -> Path:
    """Write the student (``plain_student``) as diffusers' WanTransformer3DModel folder."""
    return save_diffusers(plain_student(model, guidance), folder)


def _write_scheduler(folder: Path, steps: int, shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**student_scheduler_config(steps, shift)).save_pretrained(
        str(folder / "scheduler"))


def diffusers_lora_state(adapter: dict[str, torch.Tensor], spec: LoraSpec,
                         num_layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors, module names) of ``adapter`` in diffusers' WanTransformer3DModel layout,
    with ``alpha / R`` folded into B so that any loader (rank = alpha) applies it exactly."""
    tensors: dict[str, torch.Tensor] = {}
    parts = split_lora(adapter, num_layers, "diffusers")
    for part, (down, up) in parts.items():
        tensors[f"{part}.lora_A.weight"] = down
        tensors[f"{part}.lora_B.weight"] = up * spec.scale
    return tensors, list(parts)


def save_diffusers_lora(adapter: dict[str, torch.Tensor], spec: LoraSpec, num_layers: int,
                        folder: str | Path, weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Write ``adapter`` where ``WanPipeline.load_lora_weights(folder, weight_name=...)``
    finds it (the default name: without ``weight_name``); returns the weights file."""
    from diffusers import WanPipeline

    tensors, modules = diffusers_lora_state(adapter, spec, num_layers)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    WanPipeline.save_lora_weights(
        folder, transformer_lora_layers=tensors, weight_name=weight_name,
        transformer_lora_adapter_metadata={"r": spec.rank, "lora_alpha": spec.rank,
                                           "target_modules": sorted(set(modules))})
    return folder / weight_name


def export_lora(run_dir: str | Path, out: str | Path, *, chain: str = DEFAULT_CHAIN,
                stage: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write a LoRA stage's adapter as a diffusers Wan LoRA in ``out``, with the scheduler
    that samples on its grid (a pair's: one file per expert, ``PAIR_LORA_WEIGHT_NAMES``);
    returns what was exported."""
    run, sid = run_stage_of(Path(run_dir), chain, stage)
    found = run.stage_adapter(sid, check_grid=False)
    if found is None:
        raise SampleError(f"{sid} holds full weights, not a LoRA adapter: export it with --base")
    spec, adapter = found
    refuse_guided_lora(sid, adapter, "a diffusers LoRA", "--merged --base W [--guidance W]")
    steps, shift = student_grid(run.record(sid), run.plan(sid))
    adapters = ({LORA_WEIGHT_NAME: adapter} if not run.is_pair else dict(zip(
        PAIR_LORA_WEIGHT_NAMES.values(),
        split_experts(adapter, run.stage_folder(sid) / OUTPUT), strict=True)))
    with staged_output(out, EXPORT, overwrite=overwrite) as staging:
        names = [save_diffusers_lora(part, spec, run.dit_config.num_layers, staging, name).name
                 for name, part in adapters.items()]
        _write_scheduler(staging, steps, shift)
        pipeline = "WanImageToVideoPipeline" if run.dit_config.image_to_video else "WanPipeline"
        record = {"run": str(Path(run_dir).resolve()), "stage": sid.name, "pipeline": pipeline,
                  "lora": {"file": names[0] if len(names) == 1 else names, "rank": spec.rank,
                           "alpha": spec.alpha, "targets": list(spec.targets),
                           "scale_folded_into_B": spec.scale},
                  "steps": steps, "shift": shift, "guidance_scale": 1.0}
        if run.is_pair:
            record["boundary"] = run.boundary
        (staging / "gpd_export.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _place(source: Path, target: Path, copy: bool) -> None:
    """Link or copy a base component into a new export (``target`` does not exist yet)."""
    if not copy:
        target.symlink_to(source.resolve(), target_is_directory=True)
        return
    try:
        shutil.copytree(source, target, symlinks=False)
    except shutil.Error as exc:  # one entry per file that failed: said as one line
        raise copy_error(exc) from None


def _model_index(base: Path) -> dict[str, Any]:
    path = base / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise WanFolderError(f"{base} has no model_index.json: expected a "
                             "Wan2.1-T2V-Diffusers folder") from None
    except (OSError, ValueError) as exc:
        raise WanFolderError(f"cannot read {path}: {exc}") from None
    if index.get("_class_name") not in PIPELINES:
        raise WanFolderError(f"{path} describes {index.get('_class_name')!r}, expected one of "
                             f"{sorted(PIPELINES)} (a Wan2.1-T2V- or Wan I2V-Diffusers folder)")
    return index


def base_components(base: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """(model_index.json, the folders linked into an export) of a Wan2.1-T2V- or Wan
    I2V-Diffusers folder (with its image encoder and processor where it lists them); a clear
    error naming what is missing."""
    index = _model_index(base)
    names = LINKED + tuple(name for name in IMAGE_LINKED
                           if index.get(name) not in (None, [None, None]))
    return index, {name: component(base, name) for name in names}


def _check_base_fits(base: Path, index: dict[str, Any], sources: dict[str, Path],
                     cfg: DiTConfig) -> None:
    """The base's pipeline runs this student: its VAE's channels, text- or image-to-video,
    and the CLIP image encoder a Wan2.1-I2V student takes tokens from."""
    vae_channels = json.loads((sources["vae"] / "config.json").read_text()).get("z_dim")
    if vae_channels != cfg.out_channels:
        raise WanFolderError(f"the VAE at {sources['vae']} has {vae_channels} latent channels, "
                             f"the student {cfg.out_channels}: --base must be the folder the "
                             "teacher came from")
    task = "i2v" if cfg.image_to_video else "t2v"
    if PIPELINES[index["_class_name"]] != task:
        raise WanFolderError(f"--base {base} is a {index['_class_name']} folder, the student is "
                             f"{task} (in_channels {cfg.in_channels}): --base must be the folder "
                             "the teacher came from")
    if cfg.image_dim is not None and "image_encoder" not in sources:
        raise WanFolderError(f"the student takes CLIP image tokens (image_dim {cfg.image_dim}, "
                             f"Wan2.1-I2V) but --base {base} has no image_encoder: give the "
                             "Wan2.1-I2V folder the teacher came from")


def export_pipeline(run_dir: str | Path, base: str | Path, out: str | Path, *,
                    chain: str = DEFAULT_CHAIN, stage: int | None = None,
                    copy: bool = False, guidance: float | None = None,
                    overwrite: bool = False) -> dict[str, Any]:
    """Write the Diffusers folder ``out`` for a run's stage; returns what was exported.

    A student with a guidance input is exported at ``guidance`` (default: the run's CFG).
    ``out`` must be new, empty or (with ``overwrite``, moved aside) an earlier export.
    """
    base = Path(base)
    check_export_destination(out, base, overwrite)  # before any model is loaded
    index, sources = base_components(base)
    loaded = load_model(run_dir, chain=chain, stage=stage, device="cpu")
    if loaded.run_config is None or loaded.plan is None:
        raise SampleError(f"{run_dir} is not a gpd_train run folder (no config.json with the "
                          "run's steps); pass the --run-dir of `python -m gpd_train`")
    run = loaded.run_config
    steps, shift = student_grid(loaded.record, loaded.plan)
    _check_base_fits(base, index, sources, loaded.model.cfg)
    folded_at = None
    if has_guidance_input(loaded.model):
        folded_at = guidance if guidance is not None else run.resolved_guidance
    # expand_timesteps: the student's own (Wan2.2-TI2V), which diffusers reads from here.
    index.update(scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 transformer=["diffusers", "WanTransformer3DModel"],
                 expand_timesteps=loaded.model.cfg.expand_timesteps)
    if loaded.low_expert is not None:  # Wan2.2: transformer_2 below boundary_ratio
        index.update(transformer_2=["diffusers", "WanTransformer3DModel"],
                     boundary_ratio=loaded.boundary)
    record = {"run": str(Path(run_dir).resolve()), "model": loaded.description,
              "pipeline": index["_class_name"],
              "base": str(base.resolve()), "steps": steps, "shift": shift,
              "guidance_scale": sampling_guidance(loaded.record, loaded.plan),
              "student_guidance": folded_at,
              "components": "copied" if copy else "linked"}
    with staged_output(out, EXPORT, overwrite=overwrite) as staging:
        for name, source in sources.items():
            _place(source, staging / name, copy)
        export_transformer(loaded.model.float(), staging / "transformer", folded_at)
        if loaded.low_expert is not None:
            export_transformer(loaded.low_expert.float(), staging / "transformer_2", folded_at)
        _write_scheduler(staging, steps, shift)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (staging / "gpd_export.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def check(request: ExportRequest) -> None:
    """A wrong ``--base`` is named before any work."""
    if request.base is not None:
        base_components(Path(request.base))


def write(request: ExportRequest, kind: str) -> str:
    """Write ``request``'s stage as ``kind``; returns how to run what was written."""
    out = request.out
    if kind == LORA:
        lora = export_lora(request.run, out, chain=request.chain, stage=request.stage,
                           overwrite=request.overwrite)
        load = f"pipe.load_lora_weights({out!r}); "
        if "boundary" in lora:  # a Wan2.2 pair: each expert's adapter into its transformer
            high, low = lora["lora"]["file"]
            load = (f"pipe.load_lora_weights({out!r}, weight_name={high!r}); "
                    f"pipe.load_lora_weights({out!r}, weight_name={low!r}, "
                    "load_into_transformer_2=True); ")
        return (f"exported the LoRA of {lora['stage']} -> {out}: pipe = {lora['pipeline']}."
                f"from_pretrained(BASE); {load}"
                "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("
                f"{out!r}, subfolder='scheduler'); pipe(prompt, "
                f"num_inference_steps={lora['steps']}, guidance_scale=1.0)")
    assert request.base is not None  # the command line asks for it (FORMAT.needs_base)
    record = export_pipeline(request.run, request.base, out, chain=request.chain,
                             stage=request.stage, copy=request.copy,
                             guidance=request.guidance, overwrite=request.overwrite)
    image = "image, " if record["pipeline"] == "WanImageToVideoPipeline" else ""
    return (f"exported {record['model']} -> {out}: {record['pipeline']}.from_pretrained("
            f"{out!r})({image}prompt, num_inference_steps={record['steps']}, "
            f"guidance_scale={record['guidance_scale']!r})")


FORMAT = ExportFormat(
    name="diffusers", write=write, check=check,
    help="diffusers: a Diffusers folder or LoRA (default)",
    needs_base={FULL: "this stage holds full weights, exported as a whole pipeline folder",
                MERGED: "--merged writes a whole pipeline folder"})
