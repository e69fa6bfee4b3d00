"""How each stage's trainer is built: the student, its stage teacher, the objective and
the data streams, from a run folder (gpd_train.run.folder) and its data set.

Stage 0 trains the base teacher by flow matching. A distillation stage starts its student
as the previous stage's output and regresses it on that frozen model's target: the
guidance stage on T0's CFG velocity at w drawn from ``guidance_range`` (T0's own grid),
halving stage k on the double step of S_{k-1} on the 2K-step grid (at the trajectories'
w after a guidance stage, one teacher forward with w as input; else at the chain's
``stage_guidance``, a CFG pair where it is not 1). What differs per chain comes from its
declaration (gpd_train.config.chains) and its config table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from gpd_model import Denoiser, DiTConfig, add_guidance_input
from gpd_train.config.chains import StageId, get_chain
from gpd_train.config.horizon import HorizonGrid
from gpd_train.config.plan import check_fits
from gpd_train.config.settings import DistillConfig, RunConfig, Stage0Config
from gpd_train.data.datasets import open_data
from gpd_train.data.embeddings import PromptEmbeddingSet
from gpd_train.data.procedural import ProceduralVideos
from gpd_train.errors import ConfigError
from gpd_train.parallel import owned_streams, prepare_teacher, set_sequence, shard_student, world
from gpd_train.run.experts import ExpertPhase
from gpd_train.run.folder import TEACHER, RunFolder
from gpd_train.run.lora import lora_stage_model
from gpd_train.train.loop import Objective, StageTrainer
from gpd_train.train.objectives import (
    DistillSetup,
    FlowMatching,
    GuidanceRange,
    StageGrid,
    online_distillation,
    stage_teacher,
)
from gpd_train.train.step import cuda_graph_refusal
from gpd_train.train.streams import stream_objectives


class TrainingRun(RunFolder):
    """A run folder opened for training: its stages plus the data set they train on."""

    def __init__(self, config: RunConfig, dit_config: DiTConfig | None = None,
                 data: ProceduralVideos | PromptEmbeddingSet | None = None) -> None:
        """``dit_config`` and ``data``: a caller's own model shape and data set (a user's
        trainer, a test's micro run); else the configured ones (RunFolder, open_data)."""
        super().__init__(config, dit_config=dit_config)
        set_sequence(config.parallel.sequence, self.dit_config.num_heads)
        self.data = data if data is not None else open_data(
            config.data, self.dit_config, config.seed, config.task)


def check_cuda_graph(run: RunFolder, sid: StageId) -> None:
    """Refuse ``--cuda-graph`` where the captured step cannot train the stage (say why)."""
    if not run.config.cuda_graph:
        return
    spec = run.lora_spec(sid)
    reason = cuda_graph_refusal(
        device=run.device, processes=world().world_size,
        streams=len(owned_streams(run.config.parallel)),
        activation_checkpointing=run.config.parallel.activation_checkpointing,
        lora_stage=None if spec is None else f"{sid} (rank {spec.rank})")
    if reason is not None:
        raise ConfigError(reason)


def stage_generator(run: RunFolder, sid: StageId) -> torch.Generator:
    """The stage's data/noise stream: one seed per (run seed, chain, stage)."""
    offset = get_chain(sid.chain).seed_offset + (50 if sid.is_guidance else int(sid.stage))
    return torch.Generator().manual_seed(run.config.seed * 1000 + offset)


def stage_trainer(run: TrainingRun, sid: StageId, model: torch.nn.Module,
                  objective: Objective, optim: Stage0Config | DistillConfig,
                  generator: torch.Generator, teacher_sha256: str | None = None,
                  phase: ExpertPhase | None = None) -> StageTrainer:
    """The stage's trainer; ``phase``: one expert's phase of a pair's stage, in its own
    sub-folder, its checkpoints recording which expert and starts they train."""
    check_cuda_graph(run, sid)
    model = shard_student(model, run.config.parallel, run.config.precision, run.device)
    # The teacher's hash goes into every checkpoint: resuming under another teacher is refused.
    teacher = {} if teacher_sha256 is None else {"teacher_sha256": teacher_sha256}
    name, folder, iterations = sid.name, run.stage_folder(sid), run.plan(sid).iterations
    if phase is not None:
        name, folder, iterations = f"{name}/{phase.name}", folder / phase.name, phase.iterations
    return StageTrainer(
        name=name, model=model, objective=objective, folder=folder,
        iterations=iterations, lr=optim.lr, warmup=optim.warmup,
        final_lr_ratio=optim.final_lr_ratio, ema_decay=optim.ema_decay,
        checkpoint_every=run.config.checkpoint_every, generator=generator,
        metadata={**run.metadata(sid), **teacher}, cuda_graph=run.config.cuda_graph,
        recipe=stage_recipe(run, sid, phase))


def stage_recipe(run: RunFolder, sid: StageId,
                 phase: ExpertPhase | None = None) -> dict[str, Any]:
    """Every option that shapes the stage's result, by its configuration key (a per-stage
    list entry as ``key[i]``, resolved: the stage teacher's CFG scale even where the run's
    guidance set it): each checkpoint records it and --resume refuses another value.
    ``phase``: one expert's phase of a pair's stage, with which expert and starts."""
    if phase is not None:
        return {**stage_recipe(run, sid), "expert": phase.name,
                "expert_starts": [phase.first, phase.count]}
    cfg, plan = run.config, run.plan(sid)
    recipe: dict[str, Any] = {"seed": cfg.seed, "shift": plan.shift, "steps": plan.steps,
                              # the global batch: resuming on another rank count keeps it
                              "global_batch_size": cfg.batch_size * world().data_ranks,
                              "precision": cfg.precision}
    if sid.is_teacher:
        return {**recipe, **{f"stage0.{key}": value for key, value in asdict(cfg.stage0).items()}}
    chain_cfg, spec = cfg.chain(sid.chain), plan.lora
    options: dict[str, Any] = {
        key: getattr(chain_cfg, key) for key in ("lr", "warmup", "final_lr_ratio", "ema_decay",
                                                 "state_source", "lane_groups", "freq_form",
                                                 "freq_alpha_s", "freq_alpha_t", "freq_gamma")}
    options["lora_rank"] = 0 if spec is None else spec.rank
    if spec is not None:
        options.update(lora_alpha=spec.alpha, lora_targets=list(spec.targets))
    if sid.is_guidance:
        options["guidance_iterations"] = plan.iterations
    else:
        index = int(sid.stage) - 1
        if plan.jumps is not None:  # the jump and its teacher's (stage 0's is no entry)
            if index:
                options[f"horizons[{index - 1}]"] = plan.jumps[0]
            options[f"horizons[{index}]"] = plan.jumps[1]
        options[f"iterations[{index}]"] = plan.iterations
        options[f"freq_weight[{index}]"] = chain_cfg.freq_weight[index]
        if not plan.guidance_input:
            options[f"stage_guidance[{index}]"] = plan.teacher_guidance
            if run.is_pair:  # the low expert's (a checkpoint without it is not compared)
                options[f"stage_guidance_2[{index}]"] = plan.guidance_2
    if plan.guidance_input:
        options["guidance_range"] = plan.guidance
    section = get_chain(sid.chain).section
    return {**recipe, **{f"{section}.{key}": value for key, value in options.items()}}


def build_stage0(run: TrainingRun) -> StageTrainer:
    cfg = run.config
    model = run.new_model()
    objective, generator = stream_objectives(  # one stream per rank unless configured
        stage_generator(run, TEACHER), cfg.batch_size, cfg.parallel,
        lambda generator, batch_size: FlowMatching(
            model=model, data=run.data, generator=generator, batch_size=batch_size,
            shift=run.plan(TEACHER).shift, cfg_dropout=cfg.stage0.cfg_dropout, device=run.device,
            precision=cfg.precision))
    return stage_trainer(run, TEACHER, model, objective, cfg.stage0, generator)


@dataclass
class _StageModels:
    student: torch.nn.Module
    teacher: torch.nn.Module
    adapter: str | None = None  # LoRA: the teacher is the student's model with this adapter
    adapter_guidance: torch.nn.Module | None = None


def _stage_models(run: TrainingRun, sid: StageId) -> _StageModels:
    """The student (the previous output) and its frozen stage teacher; with LoRA one base
    serves both, the teacher being the base with the previous stage's adapter."""
    cfg, plan = run.config, run.plan(sid)
    previous, spec = plan.teacher, plan.lora
    if spec is None:
        student = run.load_stage_model(previous)  # verified against its done.json
        teacher = prepare_teacher(run.load_stage_model(previous).eval().requires_grad_(False),
                                  cfg.parallel, cfg.precision, run.device)
        return _StageModels(student, teacher)
    if run.guidance_input(sid) and world().distributed:
        raise ConfigError(f"{sid}: LoRA stages with a guidance input swap it between the "
                          "teacher's and the student's forwards, which FSDP2 cannot shard; "
                          "run this stage without torchrun")
    teacher_adapter = None if previous.is_teacher else run.load_adapter(previous, spec)
    # Loaded and cast on the CPU: a bf16 base never has an fp32 copy on the GPU.
    lora = lora_stage_model(run.load_stage_model(TEACHER, device=torch.device("cpu")), spec,
                            teacher_adapter, cfg.precision, run.guidance_input(sid),
                            run.device)
    return _StageModels(lora.model, lora.model, lora.adapter, lora.guidance_embedding)


def _teacher_and_guidance(run: TrainingRun, sid: StageId,
                          models: _StageModels) -> tuple[Denoiser, GuidanceRange]:
    """The stage teacher (a CFG pair, or one forward with w as input) and the w it uses."""
    plan = run.plan(sid)
    negative = run.data.negative.to(run.device)
    if plan.guidance_input:
        if sid.is_guidance and models.adapter is None:  # a LoRA student got it with its adapter
            add_guidance_input(models.student)
        teacher = stage_teacher(models.teacher, negative if sid.is_guidance else None,
                                models.adapter,
                                None if sid.is_guidance else models.adapter_guidance)
        return teacher, GuidanceRange(*plan.guidance)  # type: ignore[misc]
    scale = plan.teacher_guidance
    teacher = stage_teacher(models.teacher, negative if scale != 1.0 else None, models.adapter)
    return teacher, GuidanceRange(scale, scale)


def stage_grid(run: RunFolder, sid: StageId) -> StageGrid | HorizonGrid:
    """The grid a distillation stage learns on: r = steps[k-1] / steps[k] teacher steps per
    student step (1 for the guidance stage), or a horizon stage's jumps on steps[0]."""
    plan = run.plan(sid)
    return (get_chain(sid.chain).schedule.grid(plan, run.device)
            or StageGrid(plan.steps, plan.shift, plan.ratio, run.device))


def _base_teacher(run: TrainingRun, sid: StageId, models: _StageModels
                  ) -> torch.nn.Module | None:
    """The frozen stage-0 teacher a horizon stage's targets step with (None elsewhere)."""
    plan = run.plan(sid)
    if plan.jumps is None:
        return None
    if plan.teacher.is_teacher:  # type: ignore[union-attr]
        return models.teacher
    cfg = run.config
    return prepare_teacher(run.load_stage_model(TEACHER).eval().requires_grad_(False),
                           cfg.parallel, cfg.precision, run.device)


def build_distill(run: TrainingRun, sid: StageId) -> StageTrainer:
    """Stage ``sid`` of its chain: the student starts as, and learns from, the previous output."""
    cfg = run.config
    plan = run.plan(sid)  # refuses a stage the chain does not have
    check_fits(cfg, sid.chain)
    chain_cfg = cfg.chain(sid.chain)
    models = _stage_models(run, sid)
    teacher_sha256 = run.output_sha256(plan.teacher)  # type: ignore[arg-type]
    teacher, guidance = _teacher_and_guidance(run, sid, models)
    setup = DistillSetup(
        student=models.student, teacher=teacher, data=run.data, grid=stage_grid(run, sid),
        guidance=guidance, chain=chain_cfg, freq_weight=plan.freq_weight,
        device=run.device, precision=cfg.precision, base=_base_teacher(run, sid, models))
    make: Any = get_chain(sid.chain).objective_factory() or online_distillation
    objective, generator = stream_objectives(
        stage_generator(run, sid), cfg.batch_size, cfg.parallel,
        lambda generator, batch_size: make(setup, generator, batch_size))
    return stage_trainer(run, sid, models.student, objective, chain_cfg, generator,
                         teacher_sha256)
