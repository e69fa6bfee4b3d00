"""Loading a model to sample or export: a run folder's stage (verified, LoRA merged), a
stage file, a Wan2.1-T2V-Diffusers folder, a Wan2.2 A14B Diffusers folder (two experts), or
an original-Wan / diffusers checkpoint.

Reads run folders through gpd_train.run.folder; builds no data set and no trainer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpd_model import DiTConfig, WanDiT, get_preset, load_checkpoint
from gpd_model.checkpoint import config_from_diffusers
from gpd_train.config.chains import DEFAULT_CHAIN, StageId
from gpd_train.config.checks import resolve_device
from gpd_train.config.load import load_run_config
from gpd_train.config.plan import StagePlan
from gpd_train.config.settings import RunConfig
from gpd_train.errors import SampleError
from gpd_train.run.experts import BOUNDARY_KEY
from gpd_train.run.files import load_stage_output, read_metadata
from gpd_train.run.folder import TEACHER, RunFolder
from gpd_train.run.lora import METADATA_KEY as LORA_KEY
from gpd_train.run.records import OUTPUT, RECORD, read_record, verify_output
from gpd_train.run.wan_folder import ExpertFolders, expert_folders, transformer_folder

TRAIN_HINT = ("train one with `python -m gpd_train --stage 0` (writes "
              "runs/default/stage0/model.safetensors), or pass an original-Wan / diffusers "
              "checkpoint with --preset")


@dataclass
class LoadedModel:
    model: WanDiT  # of a two-expert folder: the high-noise expert
    description: str
    run_config: RunConfig | None  # the run the weights came from, when known
    plan: StagePlan | None = None  # the plan of the run's stage the weights are the output of
    record: dict[str, Any] | None = None  # the stage's done.json: its own shift and steps
    low_expert: WanDiT | None = None  # Wan2.2 A14B: the expert below ``boundary``
    boundary: float | None = None  # the sigma from which down ``low_expert`` runs


def recorded_grid(record: dict[str, Any] | None) -> tuple[int | None, float | None]:
    """(steps, shift) a stage record (done.json) says the stage was trained for."""
    options = (record or {}).get("options") or {}
    horizon, fine = options.get("horizon"), options.get("fine_steps")
    if horizon and fine and fine % horizon:
        raise SampleError(f"{record.get('stage', 'this stage')} jumps {horizon} of the teacher's "
                          f"{fine} steps, which does not divide them: it is an intermediate "
                          "horizon stage (its last step would be shorter); sample a stage "
                          f"whose horizon divides {fine}, e.g. the chain's last")
    return options.get("steps"), options.get("shift")


def _run_config(folder: Path, device: str) -> RunConfig:
    try:
        return load_run_config(folder, device=device)
    except (OSError, ValueError, AttributeError) as exc:
        raise SampleError(f"unreadable run configuration {folder / 'config.json'}: {exc}") \
            from None


def _is_run_folder(path: Path) -> bool:
    """A folder whose config.json is a run's; one holding stage folders beside a config.json
    that cannot be read is refused as such (not taken for a folder without one)."""
    config = path / "config.json"
    if not config.exists():
        return False
    try:
        text = config.read_text()
        json.loads(text)
    except (OSError, ValueError) as exc:
        if _looks_like_run(path):
            raise SampleError(f"unreadable run configuration {config}: {exc}; restore it (the "
                              "trainer rewrites it when a stage starts)") from None
        return False
    return '"steps"' in text


def _looks_like_run(path: Path) -> bool:
    """A folder holding stage folders (stage0/, stage1/ ...) without being a run folder."""
    return any(child.is_dir() for child in path.glob("stage*"))


def _enclosing_run(path: Path) -> Path | None:
    """The run folder holding a stage file (stageN/model.safetensors or vanilla/stageN/...)."""
    for parent in list(path.parents)[:3]:
        if _is_run_folder(parent):
            return parent
    return None


def run_stage_of(folder: Path, chain: str, stage: int | None,
                 device: str = "cpu") -> tuple[RunFolder, StageId]:
    """The run in ``folder`` and its ``stage`` (default: the chain's last finished one)."""
    config = _run_config(folder, device)
    run = RunFolder(config)
    stages = config.stage_count(chain)
    if stage is not None and not 0 <= stage <= stages:
        raise SampleError(f"--stage {stage}: run folder {folder} has {chain} stages 0..{stages} "
                          f"(steps {config.steps})")
    if stage is None:
        done = [sid for sid in (StageId(chain, s) for s in range(stages, -1, -1))
                if run.is_done(sid) or (run.stage_folder(sid) / RECORD).is_file()]
        if done and not run.is_done(done[0]):  # never silently the stage before it
            sid = done[0]
            raise SampleError(
                f"{sid}, the last stage {folder} records as finished, lost its output "
                f"({run.stage_folder(sid) / OUTPUT} is missing): restore it, retrain it with "
                f"`{sid.command(folder)} --restart`, or pass --stage {int(sid.stage) - 1} for the "
                "stage before it")
        if not done:
            raise SampleError(f"run folder {folder} has no finished stage; run "
                              f"`{TEACHER.command(folder)}` first")
        if done[0].is_teacher and chain != DEFAULT_CHAIN:  # stage0 is shared, not the chain's
            raise SampleError(f"run folder {folder} has no finished {chain} stage (only the "
                              f"shared stage0); train it with `{StageId(chain, 1).command(folder)}"
                              "`, or pass --stage 0 for the teacher")
        return run, done[0]
    return run, StageId(chain, stage)


def _load_stage(folder: Path, run: RunFolder, sid: StageId) -> LoadedModel:
    # Verified against its done.json, whose shift and steps sample() uses.
    if run.is_pair:  # a Wan2.2 run: both experts (gpd_train.run.experts)
        high, low = run.load_stage_experts(sid, check_grid=False)
        return LoadedModel(high, f"{folder}/{sid} (expert pair, boundary sigma "
                           f"{run.boundary:g})", run.config, run.plan(sid), run.record(sid),
                           low_expert=low, boundary=run.boundary)
    model = run.load_stage_model(sid, check_grid=False)
    return LoadedModel(model, f"{folder}/{sid}", run.config, run.plan(sid), run.record(sid))


def _load_from_run(folder: Path, chain: str, stage: int | None, device: str) -> LoadedModel:
    return _load_stage(folder, *run_stage_of(folder, chain, stage, device))


def _stage_of_run(config: RunConfig, run: Path, path: Path,
                  meta: dict[str, str]) -> StageId | None:
    """The stage of ``run`` (its guidance stage included) whose output ``path`` is (None:
    not one of the stages its configuration holds; such a file is loaded as it is,
    verified by its done.json)."""
    if path.name != OUTPUT:
        return None
    try:
        sid = StageId.parse(meta.get("stage", ""))
    except ValueError:
        return None
    if sid.folder(run).resolve() != path.parent.resolve():
        return None
    if sid.is_guidance:
        return sid if config.chain(sid.chain).guidance_stage else None
    return sid if int(sid.stage) <= config.stage_count(sid.chain) else None


def _load_gpd_file(path: Path, device: torch.device, run_device: str) -> LoadedModel:
    meta = read_metadata(path)
    run, config = _enclosing_run(path), None
    if run is not None:
        config = _run_config(run, run_device)
        sid = _stage_of_run(config, run, path, meta)
        if sid is not None:  # a stage of its run: the run folder's checks (staleness, ...)
            return _load_stage(run, RunFolder(config), sid)
    if BOUNDARY_KEY in meta:  # the run folder knows the boundary and checks the stage
        raise SampleError(f"{path} holds a Wan2.2 expert pair outside its run folder's stages: "
                          "pass its run folder with --chain/--stage instead")
    if LORA_KEY in meta:  # an adapter: the run folder holds the base it merges into
        raise SampleError(f"{path} holds a LoRA adapter, not a model (it needs its stage-0 "
                          "base): pass its run folder with --chain/--stage instead")
    record = None
    if path.name == OUTPUT and (path.parent / RECORD).is_file():  # a stage output
        verify_output(path.parent)
        record = read_record(path.parent)
    cfg = DiTConfig(**json.loads(meta["dit_config"]))
    model = load_stage_output(WanDiT(cfg), path, meta)
    return LoadedModel(model.to(device), str(path), config, record=record)


def _load_external(path: Path, preset: str | None, device: torch.device) -> LoadedModel:
    if preset is not None and transformer_folder(path) is not None:
        raise SampleError(f"--preset {preset}: {transformer_folder(path)}/config.json states "
                          "the model's shape; drop --preset (it is for checkpoints without one)")
    if preset is not None:
        cfg = get_preset(preset)
    elif transformer_folder(path) is not None:  # a transformer or a whole Diffusers folder
        path = transformer_folder(path)
        cfg = config_from_diffusers(path)
    else:
        raise SampleError(f"{path} is not a gpd_train checkpoint: pass --preset (one of "
                          "tiny, wan2.1-t2v-1.3b, wan2.1-t2v-14b) to say which model it holds")
    model = WanDiT(cfg)
    try:
        fmt = load_checkpoint(model, path)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise SampleError(f"checkpoint {path} does not fit the {preset or 'configured'} model: "
                          f"{exc}") from None
    return LoadedModel(model.to(device), f"{path} ({fmt} format)", None)


def expert_boundary(path: str | Path) -> float | None:
    """The boundary sigma of a two-expert checkpoint: a Wan2.2 folder, or a run folder whose
    stages are expert pairs (its teacher is a Wan2.2 folder); None for one model."""
    path = Path(path)
    experts = expert_folders(path)
    if experts is None and path.is_dir() and _is_run_folder(path):
        teacher = _run_config(path, "cpu").teacher
        experts = None if teacher is None else expert_folders(teacher)
    return None if experts is None else experts.boundary


def _load_experts(experts: ExpertFolders, device: torch.device) -> LoadedModel:
    """Both experts of a Wan2.2 folder; their shape and boundary were checked already."""
    models = []
    for folder in (experts.high, experts.low):
        model = WanDiT(experts.config)
        try:
            load_checkpoint(model, folder)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise SampleError(f"expert {folder} does not fit its config.json: {exc}") from None
        models.append(model.to(device))
    return LoadedModel(models[0], f"{experts.high.parent} (Wan2.2 experts, boundary sigma "
                       f"{experts.boundary:g})", None, low_expert=models[1],
                       boundary=experts.boundary)


def load_model(path: str | Path, *, preset: str | None = None, chain: str = DEFAULT_CHAIN,
               stage: int | None = None, device: str = "auto") -> LoadedModel:
    """Resolve PATH (run folder, stage folder/file, Wan or diffusers checkpoint) to a model."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"no checkpoint at {path}: {TRAIN_HINT}")
    try:
        torch_device = resolve_device(device)
        if path.is_dir() and _is_run_folder(path):
            if preset is not None:
                raise SampleError(f"--preset {preset}: {path} is a run folder, whose "
                                  "config.json states the model; drop --preset")
            return _load_from_run(path, chain, stage, device)
        if path.is_dir() and _looks_like_run(path):
            raise SampleError(f"{path} is not a complete run folder: it holds stage folders "
                              f"but no config.json (the trainer writes it when a stage starts); "
                              f"point at a stage folder ({path}/stage0) or restore config.json")
        experts = expert_folders(path)
        if experts is not None:
            if preset is not None:
                raise SampleError(f"--preset {preset}: {path} is a Wan2.2 folder whose experts' "
                                  "config.json states the model; drop --preset")
            return _load_experts(experts, torch_device)
        if path.is_dir() and (path / RECORD).is_file():
            path = path / OUTPUT
        if path.is_file() and path.suffix == ".safetensors":
            if read_metadata(path).get("format") == "gpd_train":
                if preset is not None:
                    raise SampleError(f"--preset {preset}: {path} is a gpd_train stage output, "
                                      "whose metadata states the model; drop --preset")
                return _load_gpd_file(path, torch_device, device)
        return _load_external(path, preset, torch_device)
    except SampleError:
        raise
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise SampleError(f"cannot load {path}: {exc}") from None


