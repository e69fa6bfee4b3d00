"""Export a distilled student as a Diffusers folder that diffusers' WanPipeline runs.

    python -m gpd_train.export --run runs/wan --base Wan2.1-T2V-1.3B-Diffusers --out student/

then, in Python::

    pipe = WanPipeline.from_pretrained("student/")
    video = pipe(prompt, num_inference_steps=6, guidance_scale=1.0).frames[0]

A LoRA stage (``--lora-rank``) is exported as a diffusers Wan LoRA instead
(``student/pytorch_lora_weights.safetensors`` and ``student/scheduler/``; no ``--base``)::

    pipe = WanPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")
    pipe.load_lora_weights("student/")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("student/",
                                                                     subfolder="scheduler")

``--merged --base ...`` writes it as a whole pipeline folder, the adapter merged.

``--format comfyui`` writes one safetensors file in Wan's original key layout instead, as
ComfyUI shares models (``<out>/<out's name>.safetensors``; no ``--base``): the student for
ComfyUI's ``models/diffusion_models/`` (a guidance input folded at ``--guidance``, as for
diffusers), or a LoRA stage as a LoRA for ``models/loras/`` (``diffusion_model.<module>.``
``lora_down``/``lora_up``/``alpha``, which diffusers' ``load_lora_weights`` reads too),
applied to the run's stage 0; ``--merged`` writes the merged model instead.

The folder holds the base's ``text_encoder/``, ``tokenizer/`` and ``vae/`` (symbolic links
by default, ``--copy`` for copies), the student as ``transformer/`` and a
FlowMatchEulerDiscreteScheduler whose grid at the student's step count is our
``gpd_model.sigma_grid(steps, shift)`` (see ``student_scheduler_config``). Guidance-free
students want ``guidance_scale=1.0`` (no CFG); stage 0, the teacher, wants its own CFG scale
(the run's ``guidance``). ``gpd_export.json`` records what was exported, ``guidance_scale``
included, and the command prints the call with it.

``--out`` must be a new or empty folder outside ``--base`` (a Wan/Diffusers folder or any
folder this command did not write is refused); an earlier export there is replaced only
with ``--overwrite``, which moves it aside (see gpd_train/run/destination.py).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from gpd_model import WanDiT, fold_guidance, has_guidance_input, save_diffusers
from gpd_model.checkpoint import export_state_dict
from gpd_train.config.chains import DEFAULT_CHAIN, StageId, add_chain_argument
from gpd_train.config.plan import StagePlan
from gpd_train.config.settings import check_number
from gpd_train.errors import ConfigError, GPDError, SampleError
from gpd_train.run.destination import EXPORT, check_export_destination, staged_output
from gpd_train.run.files import read_metadata
from gpd_train.run.folder import TEACHER
from gpd_train.run.loading import load_model, recorded_grid, run_stage_of
from gpd_train.run.lora import GUIDANCE_PREFIX, comfyui_lora_state, save_diffusers_lora
from gpd_train.run.lora import METADATA_KEY as LORA_KEY
from gpd_train.run.preflight import check_base_matches, check_environment, check_guidance_in_range
from gpd_train.run.records import OUTPUT
from gpd_train.run.wan_folder import WanFolderError, component
from gpd_train.run.writes import copy_error, output_error

LINKED = ("text_encoder", "tokenizer", "vae")
DIFFUSERS, COMFYUI = "diffusers", "comfyui"  # --format
NUM_TRAIN_TIMESTEPS = 1000  # Wan's: the DiT's timestep input is 1000 * sigma


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


def export_transformer(model: WanDiT, folder: str | Path, guidance: float | None = None) -> Path:
    """Write the student (``plain_student``) as diffusers' WanTransformer3DModel folder."""
    return save_diffusers(plain_student(model, guidance), folder)


def _student_grid(record: dict[str, Any] | None, plan: StagePlan) -> tuple[int, float]:
    """(steps, shift) of the exported scheduler: the stage's own (done.json), else its plan's
    (a record from before options were kept)."""
    steps, shift = recorded_grid(record)
    return steps or plan.steps, shift or plan.shift


def sampling_guidance(record: dict[str, Any] | None, plan: StagePlan) -> float:
    """The ``guidance_scale`` the exported stage samples at: the teacher's CFG scale for
    stage 0 (its done.json's, else its plan's), none (1.0) for a distilled student."""
    if not plan.stage.is_teacher:
        return 1.0
    recorded = ((record or {}).get("options") or {}).get("guidance")
    return float(recorded if recorded is not None else plan.guidance)  # type: ignore[arg-type]


def _write_scheduler(folder: Path, steps: int, shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**student_scheduler_config(steps, shift)).save_pretrained(
        str(folder / "scheduler"))


def _refuse_guided_lora(sid: StageId, adapter: dict[str, torch.Tensor], what: str,
                        instead: str) -> None:
    if any(key.startswith(GUIDANCE_PREFIX) for key in adapter):
        raise SampleError(f"{sid} takes the CFG scale as an input, which {what} cannot carry: "
                          f"export it merged at a CFG scale with {instead}")


def export_lora(run_dir: str | Path, out: str | Path, *, chain: str = DEFAULT_CHAIN,
                stage: int | None = None, overwrite: bool = False) -> dict[str, Any] | None:
    """Write a LoRA stage's adapter as a diffusers Wan LoRA in ``out``, with the scheduler
    that samples on its grid; returns what was exported, or None when the stage holds full
    weights (export those with ``export_pipeline``)."""
    run, sid = run_stage_of(Path(run_dir), chain, stage)
    found = run.stage_adapter(sid, check_grid=False)
    if found is None:
        return None
    spec, adapter = found
    _refuse_guided_lora(sid, adapter, "a diffusers LoRA", "--merged --base W [--guidance W]")
    steps, shift = _student_grid(run.record(sid), run.plan(sid))
    with staged_output(out, EXPORT, overwrite=overwrite) as staging:
        weights = save_diffusers_lora(adapter, spec, run.dit_config.num_layers, staging)
        _write_scheduler(staging, steps, shift)
        record = {"run": str(Path(run_dir).resolve()), "stage": sid.name,
                  "lora": {"file": weights.name, "rank": spec.rank, "alpha": spec.alpha,
                           "targets": list(spec.targets), "scale_folded_into_B": spec.scale},
                  "steps": steps, "shift": shift, "guidance_scale": 1.0}
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
    if index.get("_class_name") != "WanPipeline":
        raise WanFolderError(f"{path} describes {index.get('_class_name')!r}, expected "
                             "'WanPipeline' (a Wan2.1-T2V-Diffusers folder)")
    return index


def base_components(base: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """(model_index.json, the folders linked into an export) of a Wan2.1-T2V-Diffusers
    folder; a clear error naming what is missing."""
    return _model_index(base), {name: component(base, name) for name in LINKED}


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
    steps, shift = _student_grid(loaded.record, loaded.plan)
    vae_channels = json.loads((sources["vae"] / "config.json").read_text()).get("z_dim")
    if vae_channels != loaded.model.cfg.in_channels:
        raise WanFolderError(f"the VAE at {sources['vae']} has {vae_channels} latent channels, "
                             f"the student {loaded.model.cfg.in_channels}: --base must be the "
                             "folder the teacher came from")
    folded_at = None
    if has_guidance_input(loaded.model):
        folded_at = guidance if guidance is not None else run.resolved_guidance
    index.update(scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 transformer=["diffusers", "WanTransformer3DModel"])
    record = {"run": str(Path(run_dir).resolve()), "model": loaded.description,
              "base": str(base.resolve()), "steps": steps, "shift": shift,
              "guidance_scale": sampling_guidance(loaded.record, loaded.plan),
              "student_guidance": folded_at,
              "components": "copied" if copy else "linked"}
    with staged_output(out, EXPORT, overwrite=overwrite) as staging:
        for name, source in sources.items():
            _place(source, staging / name, copy)
        export_transformer(loaded.model.float(), staging / "transformer", folded_at)
        _write_scheduler(staging, steps, shift)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (staging / "gpd_export.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def comfyui_file(out: str | Path) -> str:
    """The ComfyUI export's one weights file, named after ``--out`` (the name ComfyUI lists)."""
    return f"{Path(out).resolve().name}.safetensors"


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
    steps, shift = _student_grid(run.record(sid), plan)
    record: dict[str, Any] = {
        "run": str(Path(run_dir).resolve()), "stage": sid.name, "format": COMFYUI,
        "file": comfyui_file(out), "steps": steps, "shift": shift,
        "guidance_scale": sampling_guidance(run.record(sid), plan)}
    if found is not None:
        spec, adapter = found
        _refuse_guided_lora(sid, adapter, "a ComfyUI LoRA",
                            "--format comfyui --merged [--guidance W]")
        tensors = comfyui_lora_state(adapter, spec, run.dit_config.num_layers)
        record.update(comfyui_folder="models/loras", base=TEACHER.name,
                      lora={"rank": spec.rank, "alpha": spec.alpha,
                            "targets": list(spec.targets)})
    else:
        folded_at = run.config.resolved_guidance if guidance is None else guidance
        model = run.load_stage_model(sid, check_grid=False).float()
        record.update(comfyui_folder="models/diffusion_models",
                      student_guidance=folded_at if has_guidance_input(model) else None)
        tensors = export_state_dict(plain_student(model, folded_at), "wan")
    with staged_output(out, EXPORT, overwrite=overwrite) as staging:
        save_file(tensors, str(staging / record["file"]),
                  metadata={"format": "pt", "gpd_export": json.dumps(record)})
        (staging / "gpd_export.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def comfyui_usage(record: dict[str, Any], out: str | Path) -> str:
    """What to do with a ComfyUI export: where the file goes and how to sample it."""
    path = Path(out) / record["file"]
    if "lora" in record:
        where = (f"a LoRA of {record['stage']}: put {path} in ComfyUI/{record['comfyui_folder']}/"
                 f" and apply it (LoraLoaderModelOnly, strength 1.0) to the run's "
                 f"{record['base']} (export it with --format comfyui --stage 0)")
    else:
        where = (f"{record['stage']}: put {path} in ComfyUI/{record['comfyui_folder']}/ "
                 "(Load Diffusion Model)")
    return (f"exported {where}; sample with ModelSamplingSD3 shift {record['shift']:g}, "
            f"KSampler steps {record['steps']}, cfg {record['guidance_scale']:g}, "
            "scheduler simple")


def check_export_request(args: argparse.Namespace) -> None:
    """Refuse, before any work, options the exported stage would not read: --merged on full
    weights, --guidance on a guidance-free student or outside a w-student's range, --copy
    with --format comfyui, and a --base other than the Wan folder the run was imported
    from."""
    if args.guidance is not None:
        check_number("--guidance", args.guidance, low=0, low_open=True)
    if args.format == COMFYUI and args.copy:
        raise ConfigError("--copy copies the base's text_encoder/, tokenizer/ and vae/ into a "
                          "Diffusers folder; --format comfyui writes one weights file: drop --copy")
    if args.format == COMFYUI and args.base is not None:
        raise ConfigError(f"--base {args.base}: --format comfyui writes the run's weights alone "
                          "(ComfyUI loads its own text encoder and VAE; a LoRA applies to the "
                          "run's stage 0), so nothing of --base is read: drop --base")
    if not (Path(args.run) / "config.json").is_file():
        raise SampleError(f"--run {args.run} is not a run folder: it has no config.json (the "
                          "trainer writes it when a stage starts); pass the --run-dir of "
                          "`python -m gpd_train`")
    run, sid = run_stage_of(Path(args.run), args.chain, args.stage)
    name = f"{args.chain} stage {sid.stage}"
    if args.merged and LORA_KEY not in read_metadata(run.stage_folder(sid) / OUTPUT):
        raise SampleError(f"--merged merges a LoRA adapter, but {name} holds full weights: drop "
                          "--merged (full weights are exported whole)")
    if run.guidance_input(sid):
        w = args.guidance if args.guidance is not None else run.config.resolved_guidance
        check_guidance_in_range(run.record(sid), w, name)
    elif args.guidance is not None:
        raise SampleError(f"--guidance {args.guidance:g}: {name} takes no CFG scale as an input; "
                          "the export samples it with guidance_scale=1.0: drop --guidance")
    if args.base is not None:
        check_base_matches(args.run, args.base)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpd_train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder of python -m gpd_train")
    parser.add_argument("--format", choices=(DIFFUSERS, COMFYUI), default=DIFFUSERS,
                        help="diffusers: a Diffusers folder or LoRA (default); comfyui: one "
                             "safetensors file in Wan's original keys, a model for ComfyUI's "
                             "models/diffusion_models/ or a LoRA stage for models/loras/ (no "
                             "--base needed)")
    parser.add_argument("--base", help="the Wan2.1-T2V-Diffusers folder trained on (not needed "
                        "for a LoRA stage, which is written as a LoRA unless --merged)")
    parser.add_argument("--out", required=True,
                        help="the folder to write (the Diffusers folder, or the ComfyUI file's): "
                             "a new or empty folder, outside --base (written whole, then "
                             "renamed into place)")
    add_chain_argument(parser, "the chain of the run folder's stage to export")
    parser.add_argument("--stage", type=int, help="stage to export (default: the last finished)")
    parser.add_argument("--guidance", type=float, metavar="W",
                        help="a student with a guidance input is exported sampling at this CFG "
                             "scale (default: the run's)")
    parser.add_argument("--merged", action="store_true",
                        help="a LoRA stage: write a whole pipeline folder, the adapter merged")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds an earlier export: move it aside to "
                             "<out>.old-<time>/ and write the new one")
    parser.add_argument("--copy", action="store_true",
                        help="copy text_encoder/, tokenizer/ and vae/ instead of linking them")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_environment()
        check_export_destination(args.out, args.base, args.overwrite)  # before any work
        if args.base is not None and args.format != COMFYUI:  # which refuses any --base
            base_components(Path(args.base))  # a wrong --base is named before any work
        check_export_request(args)
        if args.format == COMFYUI:
            with torch.no_grad():
                comfy = export_comfyui(args.run, args.out, chain=args.chain, stage=args.stage,
                                       guidance=args.guidance, merged=args.merged,
                                       overwrite=args.overwrite)
            print(comfyui_usage(comfy, args.out))
            return 0
        lora = None if args.merged else export_lora(args.run, args.out, chain=args.chain,
                                                     stage=args.stage, overwrite=args.overwrite)
        if lora is not None:
            print(f"exported the LoRA of {lora['stage']} -> {args.out}: pipe = WanPipeline."
                  f"from_pretrained(BASE); pipe.load_lora_weights({str(args.out)!r}); "
                  "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("
                  f"{str(args.out)!r}, subfolder='scheduler'); pipe(prompt, "
                  f"num_inference_steps={lora['steps']}, guidance_scale=1.0)")
            return 0
        if args.base is None:
            why = "--merged writes" if args.merged else "this stage holds full weights, exported as"
            raise ConfigError(f"{why} a whole pipeline folder: give --base (the "
                             "Wan2.1-T2V-Diffusers folder trained on)")
        with torch.no_grad():
            record = export_pipeline(args.run, args.base, args.out, chain=args.chain,
                                     stage=args.stage, copy=args.copy,
                                     guidance=args.guidance, overwrite=args.overwrite)
    except GPDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as exc:  # e.g. a full disk: one line naming the file
        print(f"error: {output_error(args.out, exc)}", file=sys.stderr)
        return 2
    print(f"exported {record['model']} -> {args.out}: WanPipeline.from_pretrained("
          f"{str(args.out)!r})(prompt, num_inference_steps={record['steps']}, "
          f"guidance_scale={record['guidance_scale']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
