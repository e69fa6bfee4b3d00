"""Stages in a run folder: where their outputs live, what each needs, and running them.

Layout of a run folder::

    config.json                  the configuration of the last invocation
    stage0/                      the base teacher T0 (trained or imported)
    guidance/                    the guidance stage's w-conditioned student (when enabled)
    stage1/ stage2/ stage3/      the GPD chain (students S_1..S_3)
    guided/guidance/ guided/stage1/ ...  the guided chain: guidance stage, then halving
    vanilla/stage1/ ...          the vanilla progressive-distillation ablation chain
    eval/                        report.md, report.json, contact_sheet.png, *.gif

Each stage folder holds ``model.safetensors`` (the stage output: the EMA weights),
``done.json`` (written last: the stage is complete; its SHA-256, its stage teacher's and
the options that shaped it, see gpd_train.run_folder), ``metrics.jsonl`` and ``ckpt/``.
A stage is never deleted: ``--restart`` moves it aside to ``<stage>.old-<time>/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gpd_model import (
    DiTConfig,
    WanDiT,
    add_guidance_input,
    fold_guidance,
    get_preset,
    has_guidance_input,
)

from .checkpoint import (
    GUIDANCE_INPUT_KEY,
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    atomic_write_text,
    load_stage_output,
    load_weights,
    read_metadata,
    save_weights,
    sha256_file,
)
from .config import SECTION, DistillConfig, RunConfig, Stage0Config
from .data import open_data
from .loop import Objective, StageTrainer, resolve_device
from .lora import METADATA_KEY, LoraSpec, adapter_from_params, lora_stage_model, merge_adapter
from .objectives import (
    FlowMatching,
    GuidanceRange,
    OnlineDistillation,
    StageGrid,
    StageTeacher,
)
from .parallel import (
    is_main,
    main_only,
    owned_streams,
    prepare_teacher,
    shard_student,
    stream_objectives,
    world,
)
from .run_folder import (
    OPTIONS_KEY,
    RunFolderError,
    StageExistsError,
    StaleStageError,
    move_aside,
    read_record,
    verify_output,
)
from .step import cuda_graph_refusal
from .wan_folder import teacher_dit_config, transformer_folder


class MissingStageError(RuntimeError):
    """A stage's input (the previous stage's output) is not in the run folder."""


# A stage is 0 (the base teacher), 1..N (halving), or GUIDANCE_STAGE (the w-conditioned
# stage between 0 and 1 of the GPD chain).
GUIDANCE_STAGE = "g"
Stage = int | str


def stage_name(chain: str, stage: Stage) -> str:
    """The stage's folder: stage0 is shared; the gpd chain at the top, others in their own."""
    if stage == 0:
        return "stage0"
    own = "guidance" if stage == GUIDANCE_STAGE else f"stage{stage}"
    return own if chain == "gpd" else f"{chain}/{own}"


def parse_stage_name(name: str) -> tuple[str, Stage]:
    """(chain, stage) of a stage folder name (``stage_name``'s inverse)."""
    chain, _, own = name.rpartition("/")
    stage: Stage = GUIDANCE_STAGE if own == "guidance" else int(own.removeprefix("stage"))
    return chain or "gpd", stage


def stage_command(chain: str, stage: Stage) -> str:
    suffix = f" --chain {chain}" if chain != "gpd" and stage != 0 else ""
    return f"python -m gpd_train --stage {stage}{suffix}"


class Run:
    """One run folder with its configuration, model shape, device and data."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.folder = Path(config.run_dir)
        self.device = resolve_device(config.device)
        # A Diffusers teacher folder states its own shape (any Wan2.1 size); else the preset.
        self.dit_config: DiTConfig = (teacher_dit_config(config.teacher)
                                      or get_preset(config.preset))
        self.data = open_data(config.data, self.dit_config.text_dim,
                              self.dit_config.in_channels, config.seed)

    def stage_folder(self, chain: str, stage: Stage) -> Path:
        return self.folder / stage_name(chain, stage)

    def is_done(self, chain: str, stage: Stage) -> bool:
        folder = self.stage_folder(chain, stage)
        return (folder / "done.json").is_file() and (folder / "model.safetensors").is_file()

    def command(self, chain: str, stage: Stage) -> str:
        """The command line that (re)runs a stage of this run folder."""
        default = str(self.folder) == RunConfig.run_dir
        return stage_command(chain, stage) + ("" if default else f" --run-dir {self.folder}")

    def record(self, chain: str, stage: Stage) -> dict[str, Any]:
        """The finished stage's done.json (its summary and provenance)."""
        return read_record(self.stage_folder(chain, stage))

    def output_sha256(self, chain: str, stage: Stage) -> str:
        """The recorded SHA-256 of a finished stage's output (hashed when not recorded)."""
        return self.record(chain, stage).get("sha256") or sha256_file(
            self.stage_folder(chain, stage) / "model.safetensors")

    def stale_reason(self, chain: str, stage: Stage) -> str | None:
        """Why a finished stage no longer follows from its stage teacher (None: it does).

        A stage is stale when the teacher it recorded is gone, stale itself, another stage
        (e.g. a guidance stage was switched on) or has another SHA-256 (retrained). Stage
        records from before provenance was kept carry no teacher hash and are trusted.
        """
        if stage == 0:
            return None
        recorded = self.record(chain, stage)
        if "teacher_sha256" not in recorded:
            return None
        previous = self.previous_stage(chain, stage)
        name = stage_name(chain, previous)
        if recorded.get("teacher") != name:
            return (f"it was distilled from {recorded.get('teacher')}, this run's stage teacher "
                    f"is {name}")
        if not self.is_done(chain, previous):
            return f"its stage teacher {name} is no longer complete"
        reason = self.stale_reason(chain, previous)
        if reason is not None:
            return f"its stage teacher {name} is stale ({reason})"
        current = self.output_sha256(chain, previous)
        if current != recorded["teacher_sha256"]:
            return (f"its stage teacher {name} changed since (SHA-256 "
                    f"{recorded['teacher_sha256'][:12]}... then, {current[:12]}... now)")
        return None

    def partial_stale_reason(self, chain: str, stage: Stage) -> str | None:
        """Why an unfinished stage's checkpoints no longer follow from its stage teacher
        (None: they do, there are none, or they record no teacher or cannot be read, which
        resuming reports itself)."""
        newest = CheckpointStore(self.stage_folder(chain, stage) / "ckpt").candidates()
        if stage == 0 or self.is_done(chain, stage) or not newest:
            return None
        previous = self.previous_stage(chain, stage)
        if not self.is_done(chain, previous):
            return None
        try:
            manifest = json.loads((newest[0] / MANIFEST).read_text())
            saved = manifest["metadata"]["teacher_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        current = self.output_sha256(chain, previous)
        if saved == current:
            return None
        return (f"its checkpoints ({newest[0].name}) were written under its stage teacher "
                f"{stage_name(chain, previous)} at SHA-256 {saved[:12]}..., which is now "
                f"{current[:12]}...")

    def stage_options(self, chain: str, stage: Stage) -> dict[str, Any]:
        """What shaped a stage beyond its teacher: the grid and the guidance it absorbed."""
        cfg = self.config
        options: dict[str, Any] = {"shift": cfg.resolved_shift,
                                   "steps": stage_steps(self, stage)}
        if stage == 0:
            return {**options, "guidance": cfg.resolved_guidance}
        chain_cfg = cfg.chain(chain)
        if stage == GUIDANCE_STAGE or self.guidance_input(chain, stage):
            guidance: Any = [float(w) for w in chain_cfg.guidance_range]
        else:
            guidance = cfg.stage_guidance(chain)[int(stage) - 1]
        spec = self.lora_spec(chain, stage)
        lora = {} if spec is None else {"lora": json.loads(spec.to_metadata())}
        return {**options, "teacher_steps": stage_steps(self, self.previous_stage(chain, stage)),
                "guidance": guidance, "guidance_input": self.guidance_input(chain, stage),
                "state_source": chain_cfg.state_source, **lora}

    def _check_grid(self, chain: str, stage: Stage, recorded: dict[str, Any]) -> None:
        """A distilled stage samples only on the grid it learned (shift and steps)."""
        options = recorded.get("options")
        if stage == 0 or not isinstance(options, dict):
            return  # the teacher samples at any grid; old records carry no options
        want = {"shift": self.config.resolved_shift, "steps": stage_steps(self, stage)}
        for key, value in want.items():
            if key in options and options[key] != value:
                raise RunFolderError(
                    f"{stage_name(chain, stage)} was distilled with {key} {options[key]} "
                    f"({self.stage_folder(chain, stage) / 'done.json'}); this run asks for "
                    f"{key} {value}. Drop the option that changed it (--shift, steps), or "
                    "train another --run-dir")

    def has_guidance_stage(self, chain: str) -> bool:
        return self.config.chain(chain).guidance_stage

    def guidance_input(self, chain: str, stage: Stage) -> bool:
        """Whether the stage's model takes w as an input (the guidance stage and after)."""
        return self.has_guidance_stage(chain) and stage != 0

    def lora_spec(self, chain: str, stage: Stage) -> LoraSpec | None:
        """The LoRA spec the stage trains with; None: full weights (always for stage 0)."""
        return None if stage == 0 else self.config.chain(chain).lora_spec()

    def previous_stage(self, chain: str, stage: Stage) -> Stage:
        """The stage whose output is this stage's teacher and the student's start."""
        if stage == GUIDANCE_STAGE:
            return 0
        if stage == 1 and self.has_guidance_stage(chain):
            return GUIDANCE_STAGE
        return int(stage) - 1

    def metadata(self, chain: str, stage: Stage) -> dict[str, str]:
        spec = self.lora_spec(chain, stage)
        lora = {} if spec is None else {METADATA_KEY: spec.to_metadata()}
        return {"format": "gpd_train", "stage": stage_name(chain, stage),
                "dit_config": json.dumps(asdict(self.dit_config), sort_keys=True),
                GUIDANCE_INPUT_KEY: str(int(self.guidance_input(chain, stage))), **lora}

    def new_model(self, device: torch.device | None = None) -> WanDiT:
        torch.manual_seed(self.config.seed)  # the initialisation is part of the run's seed
        return WanDiT(self.dit_config).to(device or self.device)

    def load_stage_model(self, chain: str, stage: Stage, fold_at: float | None = None,
                         check_grid: bool = True, device: torch.device | None = None) -> WanDiT:
        """The output (EMA weights) of a finished, current stage, verified against the
        SHA-256 in its done.json; a clear error when it is missing, stale or corrupt.

        A LoRA stage's adapter is merged into stage 0, the base it was trained on. A model
        with a guidance input (the guidance stage and the students after it) keeps it, or
        with ``fold_at`` = w becomes a plain Wan2.1 model sampling at that CFG scale.
        ``check_grid`` refuses a distilled stage whose shift/steps differ from this run's
        (callers that take the grid from the stage record, like the sampler, skip it).
        ``device`` overrides the run's (e.g. the CPU, to cast before moving).
        """
        path, meta = self._verified_output(chain, stage, check_grid)
        if METADATA_KEY in meta:
            spec = LoraSpec.from_metadata(meta[METADATA_KEY], path)
            model = merge_adapter(self.load_stage_model("gpd", 0, device=device),
                                  load_weights(path), spec, path)
        else:
            model = load_stage_output(self.new_model(device), path, meta)
        if fold_at is not None and has_guidance_input(model):
            return fold_guidance(model, fold_at)
        return model

    def stage_adapter(self, chain: str, stage: Stage, check_grid: bool = True
                      ) -> tuple[LoraSpec, dict[str, torch.Tensor]] | None:
        """(spec, adapter) of a finished LoRA stage, verified; None for full weights."""
        path, meta = self._verified_output(chain, stage, check_grid)
        if METADATA_KEY not in meta:
            return None
        return LoraSpec.from_metadata(meta[METADATA_KEY], path), load_weights(path)

    def load_adapter(self, chain: str, stage: Stage, spec: LoraSpec) -> dict[str, torch.Tensor]:
        """The adapter a finished LoRA stage trained under ``spec`` (the next LoRA stage's
        teacher); refused when the stage holds full weights or another spec."""
        found = self.stage_adapter(chain, stage)
        name, command = stage_name(chain, stage), self.command(chain, stage)
        if found is None:
            raise RunFolderError(
                f"{name} holds full weights ({self.stage_folder(chain, stage)}), but this stage "
                f"trains LoRA adapters on stage 0 (lora_rank {spec.rank}): a LoRA chain is LoRA "
                f"from its stage 1. Retrain {name} with the same LoRA options (`{command} "
                f"--restart --lora-rank {spec.rank}`) or train this stage without --lora-rank")
        saved, adapter = found
        if saved != spec:
            raise RunFolderError(
                f"{name} was trained with LoRA rank {saved.rank}, alpha {saved.alpha:g}, "
                f"targets {list(saved.targets)}; this stage asks for rank {spec.rank}, alpha "
                f"{spec.alpha:g}, targets {list(spec.targets)}. A stage starts from its "
                f"teacher's adapter: use the same LoRA options, or retrain {name} with "
                f"`{command} --restart`")
        return adapter

    def _verified_output(self, chain: str, stage: Stage,
                         check_grid: bool) -> tuple[Path, dict[str, str]]:
        """(path, metadata) of a finished, current stage's output that verifies."""
        if not self.is_done(chain, stage):
            raise MissingStageError(
                f"{stage_name(chain, stage)} is not complete in {self.folder} (no "
                f"{self.stage_folder(chain, stage) / 'done.json'}); run "
                f"`{self.command(chain, stage)}` first")
        reason = self.stale_reason(chain, stage)
        if reason is not None:
            raise StaleStageError(f"{stage_name(chain, stage)} is stale: {reason}; retrain it "
                                  f"with `{self.command(chain, stage)} --restart`")
        if check_grid:
            self._check_grid(chain, stage, self.record(chain, stage))
        verify_output(self.stage_folder(chain, stage))
        path = self.stage_folder(chain, stage) / "model.safetensors"
        meta = read_metadata(path)
        expected = self.metadata(chain, stage)["dit_config"]
        if meta.get("dit_config") != expected:
            raise ValueError(f"{path} was written for model config {meta.get('dit_config')}, "
                             f"this run uses {expected} (preset {self.config.preset!r})")
        return path, meta

    def finish_stage(self, chain: str, stage: Stage, weights: dict[str, torch.Tensor],
                     summary: dict[str, Any]) -> Path:
        """Write the stage output, then done.json with its provenance (``summary`` may
        carry ``teacher_sha256``, the teacher hash the stage started from)."""
        folder = self.stage_folder(chain, stage)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "done.json").unlink(missing_ok=True)
        output = folder / "model.safetensors"
        options = self.stage_options(chain, stage)
        # Also inside the output, which done.json's SHA-256 covers: a hand edit is detected.
        save_weights(output, weights, {**self.metadata(chain, stage),
                                       OPTIONS_KEY: json.dumps(options, sort_keys=True)})
        record = {"options": options, **summary, "sha256": sha256_file(output)}
        if stage != 0:
            previous = self.previous_stage(chain, stage)
            record["teacher"] = stage_name(chain, previous)
            record.setdefault("teacher_sha256", self.output_sha256(chain, previous))
        atomic_write_text(folder / "done.json", json.dumps(record, indent=1, sort_keys=True))
        return output

    def save_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "config.json", self.config.to_json())


def check_cuda_graph(run: Run, chain: str, stage: Stage) -> None:
    """Refuse ``--cuda-graph`` where the captured step cannot train the stage (say why)."""
    if not run.config.cuda_graph:
        return
    spec = run.lora_spec(chain, stage)
    reason = cuda_graph_refusal(
        device=run.device, processes=world().world_size,
        streams=len(owned_streams(run.config.parallel)),
        activation_checkpointing=run.config.parallel.activation_checkpointing,
        lora_stage=None if spec is None else f"{stage_name(chain, stage)} (rank {spec.rank})")
    if reason is not None:
        raise ValueError(reason)


def _trainer(run: Run, chain: str, stage: Stage, model: torch.nn.Module, objective: Objective,
             iterations: int, optim: Stage0Config | DistillConfig,
             generator: torch.Generator, teacher_sha256: str | None = None) -> StageTrainer:
    check_cuda_graph(run, chain, stage)
    model = shard_student(model, run.config.parallel, run.config.precision, run.device)
    # The teacher's hash goes into every checkpoint: resuming under another teacher is refused.
    teacher = {} if teacher_sha256 is None else {"teacher_sha256": teacher_sha256}
    return StageTrainer(
        name=stage_name(chain, stage), model=model, objective=objective,
        folder=run.stage_folder(chain, stage), iterations=iterations, lr=optim.lr,
        warmup=optim.warmup, final_lr_ratio=optim.final_lr_ratio, ema_decay=optim.ema_decay,
        checkpoint_every=run.config.checkpoint_every, generator=generator,
        metadata={**run.metadata(chain, stage), **teacher}, cuda_graph=run.config.cuda_graph,
        recipe=stage_recipe(run, chain, stage))


def stage_recipe(run: Run, chain: str, stage: Stage) -> dict[str, Any]:
    """Every option that shapes the stage's result, by its configuration key (a per-stage
    list entry as ``key[i]``, resolved: the stage teacher's CFG scale even where the run's
    guidance set it): each checkpoint records it and --resume refuses another value."""
    cfg = run.config
    recipe: dict[str, Any] = {"seed": cfg.seed, "shift": cfg.resolved_shift,
                              "steps": stage_steps(run, stage), "batch_size": cfg.batch_size,
                              "precision": cfg.precision}
    if stage == 0:
        return {**recipe, **{f"stage0.{key}": value for key, value in asdict(cfg.stage0).items()}}
    chain_cfg, spec = cfg.chain(chain), run.lora_spec(chain, stage)
    options: dict[str, Any] = {
        key: getattr(chain_cfg, key) for key in ("lr", "warmup", "final_lr_ratio", "ema_decay",
                                                 "state_source", "lane_groups", "freq_alpha_s",
                                                 "freq_alpha_t", "freq_gamma")}
    options["lora_rank"] = 0 if spec is None else spec.rank
    if spec is not None:
        options.update(lora_alpha=spec.alpha, lora_targets=list(spec.targets))
    if stage == GUIDANCE_STAGE:
        options["guidance_iterations"] = chain_cfg.guidance_iterations
    else:
        index = int(stage) - 1
        options[f"iterations[{index}]"] = chain_cfg.iterations[index]
        options[f"freq_weight[{index}]"] = chain_cfg.freq_weight[index]
        if not run.guidance_input(chain, stage):
            options[f"stage_guidance[{index}]"] = cfg.stage_guidance(chain)[index]
    if stage == GUIDANCE_STAGE or run.guidance_input(chain, stage):
        options["guidance_range"] = [float(w) for w in chain_cfg.guidance_range]
    return {**recipe, **{f"{SECTION[chain]}.{key}": value for key, value in options.items()}}


def stage_generator(run: Run, chain: str, stage: Stage) -> torch.Generator:
    offset = {"gpd": 0, "vanilla": 100, "guided": 200}[chain] + (
        50 if stage == GUIDANCE_STAGE else int(stage))
    return torch.Generator().manual_seed(run.config.seed * 1000 + offset)


def build_stage0(run: Run) -> StageTrainer:
    cfg = run.config
    model = run.new_model()
    objective, generator = stream_objectives(  # one stream per rank unless configured
        stage_generator(run, "gpd", 0), cfg.batch_size, cfg.parallel,
        lambda generator, batch_size: FlowMatching(
            model=model, data=run.data, generator=generator, batch_size=batch_size,
            shift=cfg.resolved_shift, cfg_dropout=cfg.stage0.cfg_dropout, device=run.device,
            precision=cfg.precision))
    return _trainer(run, "gpd", 0, model, objective, cfg.stage0.iterations, cfg.stage0,
                    generator)


def stage_iterations(run: Run, chain: str, stage: Stage) -> int:
    chain_cfg = run.config.chain(chain)
    if stage == GUIDANCE_STAGE:
        return chain_cfg.guidance_iterations
    return int(chain_cfg.iterations[int(stage) - 1])


def stage_steps(run: Run, stage: Stage) -> int:
    """The student's sampling steps: the teacher's grid for the guidance stage."""
    return run.config.steps[0 if stage == GUIDANCE_STAGE else int(stage)]


def build_distill(run: Run, chain: str, stage: Stage) -> StageTrainer:
    """Stage ``stage`` of ``chain``: the student starts as, and learns from, the previous output.

    The guidance stage gives T0 a zero-initialised guidance input and regresses it on T0's
    CFG velocity at w drawn from ``guidance_range``, on T0's own grid. Halving stage k
    regresses S_k on the double step of the frozen S_{k-1} on the 2K-step grid: at the
    trajectories' w after a guidance stage (one teacher forward, w as input), else at the
    chain's ``stage_guidance`` (a CFG pair where it is not 1).
    """
    cfg = run.config
    if stage != GUIDANCE_STAGE and not (isinstance(stage, int) and 1 <= stage <= cfg.num_stages):
        raise ValueError(f"distillation stage must be {GUIDANCE_STAGE!r} or in "
                         f"1..{cfg.num_stages}, got {stage!r}")
    if stage == GUIDANCE_STAGE and not run.has_guidance_stage(chain):
        raise ValueError(f"the {chain} chain has no guidance stage (set distill.guidance_stage "
                         "= true in the TOML file)")
    chain_cfg = cfg.chain(chain)
    previous = run.previous_stage(chain, stage)
    spec = run.lora_spec(chain, stage)
    adapter: str | None = None
    adapter_guidance: torch.nn.Module | None = None
    if spec is not None:  # one base: the teacher is the student's model with its adapter
        if run.guidance_input(chain, stage) and world().distributed:
            raise ValueError(f"{stage_name(chain, stage)}: LoRA stages with a guidance input "
                             "swap it between the teacher's and the student's forwards, which "
                             "FSDP2 cannot shard; run this stage without torchrun")
        teacher_adapter = None if previous == 0 else run.load_adapter(chain, previous, spec)
        # Loaded and cast on the CPU: a bf16 base never has an fp32 copy on the GPU.
        lora = lora_stage_model(run.load_stage_model("gpd", 0, device=torch.device("cpu")),
                                spec, teacher_adapter, cfg.precision,
                                run.guidance_input(chain, stage), run.device)
        student = teacher_model = lora.model
        adapter, adapter_guidance = lora.adapter, lora.guidance_embedding
    else:
        student = run.load_stage_model(chain, previous)  # verified against its done.json
        teacher_model = prepare_teacher(run.load_stage_model(chain, previous).eval()
                                        .requires_grad_(False), cfg.parallel, cfg.precision,
                                        run.device)
    teacher_sha256 = run.output_sha256(chain, previous)  # once loading verified it
    negative = run.data.negative_context.to(run.device)
    if stage == GUIDANCE_STAGE:
        if spec is None:  # a LoRA student got its guidance input with its adapter
            add_guidance_input(student)
        teacher = StageTeacher(teacher_model, negative, adapter)
        guidance = GuidanceRange(*map(float, chain_cfg.guidance_range))
    elif run.guidance_input(chain, stage):
        teacher = StageTeacher(teacher_model, None, adapter, adapter_guidance)
        guidance = GuidanceRange(*map(float, chain_cfg.guidance_range))
    else:
        scale = cfg.stage_guidance(chain)[int(stage) - 1]
        teacher = StageTeacher(teacher_model, negative if scale != 1.0 else None, adapter)
        guidance = GuidanceRange(scale, scale)
    grid = StageGrid(stage_steps(run, stage), cfg.resolved_shift,
                     1 if stage == GUIDANCE_STAGE else 2, run.device)
    freq_weight = 0.0 if stage == GUIDANCE_STAGE else float(chain_cfg.freq_weight[int(stage) - 1])
    objective, generator = stream_objectives(
        stage_generator(run, chain, stage), cfg.batch_size, cfg.parallel,
        lambda generator, batch_size: OnlineDistillation(
            student=student, teacher=teacher, data=run.data, generator=generator, grid=grid,
            guidance=guidance, source=chain_cfg.state_source, batch_size=batch_size,
            freq_weight=freq_weight,
            freq_params={"alpha_s": chain_cfg.freq_alpha_s,
                         "alpha_t": chain_cfg.freq_alpha_t, "gamma": chain_cfg.freq_gamma},
            device=run.device, precision=cfg.precision, lane_groups=chain_cfg.lane_groups))
    return _trainer(run, chain, stage, student, objective, stage_iterations(run, chain, stage),
                    chain_cfg, generator, teacher_sha256)


def prepare_stage_folder(run: Run, chain: str, stage: Stage, resume: bool,
                         restart: bool) -> Path | None:
    """Refuse to overwrite a stage unless asked; returns the finished output to keep, if any.

    ``restart`` moves the stage folder aside; ``resume`` continues its checkpoints (a
    finished, current stage is kept as it is). Without either, a stage holding checkpoints
    or an output is refused, naming both choices.
    """
    folder, name, command = (run.stage_folder(chain, stage), stage_name(chain, stage),
                             run.command(chain, stage))
    if restart:
        moved = main_only(move_aside, folder)
        if moved is not None:
            tqdm.write(f"[{name}] --restart: moved the old stage to {moved}")
        return None
    if run.is_done(chain, stage):
        reason = run.stale_reason(chain, stage)
        if reason is not None:
            raise StaleStageError(f"{name} is stale: {reason}; retrain it with "
                                  f"`{command} --restart` (moves {folder} aside)")
        if resume:
            check_kept_output(folder, name, command)
            tqdm.write(f"[{name}] already complete ({folder / 'model.safetensors'}); kept")
            return folder / "model.safetensors"
        raise StageExistsError(
            f"{name} is already complete ({folder / 'model.safetensors'}); to train it again "
            f"run `{command} --restart` (moves it aside to {folder.name}.old-<time>/)")
    checkpoints = sorted((folder / "ckpt").glob("step-*"))
    if checkpoints and not resume:
        raise StageExistsError(
            f"{name} has checkpoints up to {checkpoints[-1].name} in {folder / 'ckpt'}; run "
            f"`{command} --resume` to continue it, or `{command} --restart` to move it aside "
            f"(to {folder.name}.old-<time>/) and start over")
    return None


def check_kept_output(folder: Path, name: str, command: str) -> None:
    """A finished stage is kept only when its output still has the SHA-256 its done.json
    records: a truncated or altered file is refused, not reported complete."""
    try:
        verify_output(folder)
    except (CheckpointError, RunFolderError) as exc:
        raise RunFolderError(f"{name} is recorded complete, but {exc} (`{command} --restart` "
                             f"moves {folder} aside)") from None


def run_stage(run: Run, chain: str, stage: Stage, resume: bool, restart: bool = False) -> Path:
    """Train (or import, for stage 0 with a teacher path) one stage; returns its output."""
    started = time.perf_counter()
    kept = prepare_stage_folder(run, chain, stage, resume, restart)
    if kept is not None:
        return kept
    if stage == 0 and run.config.teacher is not None:
        run.save_config()
        return main_only(import_teacher, run, run.config.teacher)  # one reader/writer
    check_cuda_graph(run, chain, stage)  # before loading anything
    trainer = build_stage0(run) if stage == 0 else build_distill(run, chain, stage)
    if resume:
        trainer.checkpoints.check_recipe()
    main_only(run.save_config)  # only once the stage's inputs and options were accepted
    trainer.run(resume=resume)
    final = list(trainer.metrics.records())[-20:]
    summary = {"stage": stage_name(chain, stage), "iterations": trainer.iterations,
               "final_loss_mean20": sum(r["loss"] for r in final) / max(1, len(final)),
               "seconds": time.perf_counter() - started,
               "steps": stage_steps(run, stage)}
    if "teacher_sha256" in trainer.metadata:
        summary["teacher_sha256"] = trainer.metadata["teacher_sha256"]
    from .dist_checkpoint import finish_stage  # gathers a sharded EMA under torchrun

    weights = trainer.ema.state_dict()
    if run.lora_spec(chain, stage) is not None:
        weights = adapter_from_params(weights)  # a LoRA stage's output is its adapter alone
    output = finish_stage(run, chain, stage, weights, summary)
    tqdm.write(f"[{stage_name(chain, stage)}] done in {summary['seconds']:.0f} s -> {output}")
    return output


def import_teacher(run: Run, path: str) -> Path:
    """Stage 0 from pretrained Wan2.1 weights (either key format) through gpd_model."""
    from gpd_model import load_checkpoint

    model = run.new_model()
    load_checkpoint(model, transformer_folder(path) or path)
    output = run.finish_stage("gpd", 0, model.state_dict(), {
        "stage": "stage0", "imported_from": str(path), "steps": run.config.steps[0]})
    tqdm.write(f"[stage0] imported {path} -> {output}")
    return output


def pipeline_plan(config: RunConfig) -> list[tuple[str, Stage]]:
    """Every stage of the embedded pipeline in order: T0, then each of ``pipeline_chains``."""
    plan: list[tuple[str, Stage]] = [("gpd", 0)]
    for chain in config.pipeline_chains:
        if config.chain(chain).guidance_stage:
            plan.append((chain, GUIDANCE_STAGE))
        plan += [(chain, k) for k in range(1, config.num_stages + 1)]
    return plan


def run_pipeline(config: RunConfig, resume: bool = True, evaluate: bool = True) -> Path | None:
    """All stages (skipping complete ones, resuming partial ones), then the evaluation."""
    run = Run(config)
    for chain, stage in pipeline_plan(config):
        check_cuda_graph(run, chain, stage)  # every stage, before the first trains
    for chain, stage in pipeline_plan(config):
        if run.is_done(chain, stage):
            reason = run.stale_reason(chain, stage)
            if reason is None:
                tqdm.write(f"[{stage_name(chain, stage)}] already complete, skipped")
                continue
            tqdm.write(f"[{stage_name(chain, stage)}] stale: {reason}; retraining it")
            run_stage(run, chain, stage, resume=False, restart=True)
            continue
        reason = run.partial_stale_reason(chain, stage)
        if reason is not None:
            tqdm.write(f"[{stage_name(chain, stage)}] stale: {reason}; moving it aside and "
                       "training it again")
            run_stage(run, chain, stage, resume=False, restart=True)
            continue
        run_stage(run, chain, stage, resume=resume)
    if not evaluate or not is_main():  # under torchrun rank 0 evaluates alone
        return None
    from .evaluate import evaluate_run

    return evaluate_run(run)
