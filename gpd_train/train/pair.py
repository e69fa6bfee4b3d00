"""Distilling a Wan2.2 expert pair: a stage whose teacher and student are two experts.

The stage teacher is the previous stage's pair, frozen: ``ExpertPair`` routes each sample of
a target's teacher steps to the expert of its sigma, so the steps inside one student step
may cross the boundary. The student is a pair too, each expert starting as the previous
stage's; a student step is taken by the expert of its start sigma.

The experts train one after the other, in phases over the student starts
(gpd_train.run.experts ``expert_phases``): first the high expert on the starts at or above
the boundary, then the low expert on the rest. Only one trainable expert and its optimizer
state are in memory at a time (its phase's StageTrainer, in ``<stage>/<expert>/``). High
first because, with student rollouts as the state source, the low expert then trains on
the states the finished high expert leads into, the ones it meets when the pair samples;
alternating blocks would train it on states of a high expert that later moves on, and keep
both optimizer states or rebuild them at every switch.

A phase's lanes live on its own starts: fresh noise is first carried down to the phase's
first start (``lead_in``: the finished high expert for student rollouts, the teacher for
teacher rollouts), so the low phase never spends a step on the high starts.

With LoRA (``--lora-rank``) each expert trains its own adapter in its phase, on that expert
of stage 0 as the frozen base (``PairTrainer._lora_models``: one base per expert serves its
teacher, student and lead-in adapters); a phase's output and the stage's are adapters, in
gpd_train.run.lora's layout under the experts' prefixes. The teacher pair guides each
sample by its expert's CFG scale (``stage_guidance``, ``stage_guidance_2`` for the low one).

Under torchrun the phase's expert is sharded as one model's student is, and the frozen
experts (the teacher pair, the lead-in) are prepared as one model's teacher is
(gpd_train.parallel: FSDP2 or replicated, split over the sequence ranks). A sharded
expert's forward is a collective, so the teacher pair runs as ``RankAlignedPair``: every
rank runs the experts any rank's samples need, in the same order. With LoRA the phase's
expert (its teacher view included: the same model) is sharded as the student, the other
expert's base with its adapters as a teacher, and rank 0 writes the adapters alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gpd_model import (
    CFG,
    Conditioning,
    Denoiser,
    DiTDenoiser,
    ExpertPair,
    ExpertScales,
    WanDiT,
    euler_step,
)
from gpd_model.denoiser import check_sigma
from gpd_train.config.chains import StageId, get_chain
from gpd_train.config.plan import check_fits
from gpd_train.devices import autocast
from gpd_train.errors import ConfigError
from gpd_train.parallel import (
    any_across_ranks,
    gathered_on_main,
    is_main,
    main_only,
    prepare_teacher,
    world,
)
from gpd_train.run.experts import (
    EXPERTS,
    PHASE_OUTPUT,
    ExpertPhase,
    expert_phases,
    join_experts,
)
from gpd_train.run.files import CheckpointError, load_weights, read_metadata, save_weights
from gpd_train.run.folder import TEACHER
from gpd_train.run.lora import (
    STUDENT,
    adapter_from_params,
    expert_adapters,
    lora_stage_model,
    set_adapter_weights,
)
from gpd_train.run.records import OUTPUT
from gpd_train.train.builders import (
    TrainingRun,
    stage_generator,
    stage_grid,
    stage_recipe,
    stage_trainer,
)
from gpd_train.train.checkpoint import Checkpointer
from gpd_train.train.loop import MetricsLog, StageTrainer
from gpd_train.train.objectives import (
    AdapterDenoiser,
    DistillSetup,
    GuidanceRange,
    OnlineDistillation,
    StageGrid,
    online_arguments,
)
from gpd_train.train.streams import stream_objectives


class RankAlignedPair(ExpertPair):
    """An ExpertPair whose experts' forwards are collectives (FSDP2 gathers each block's
    shards from every rank): all ranks must run the same experts in the same order. Two
    experts of one shape would otherwise pair one rank's gathers of the low expert with
    another's of the high one (wrong weights, no error) or hang.

    Today's phases keep the ranks in step by construction: every data stream's rollout
    lanes sit at the same grid indices at every update (RolloutLanes places them by batch
    position, not by a draw), so every rank's teacher calls see the same sigmas. The pair
    does not rely on that: the ranks agree on the experts any of them needs (one
    all-reduce per call), and a rank without a sample for one runs it on its first sample
    and drops the result (a WanDiT refuses an empty batch). Each sample's velocity is the
    plain pair's."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor:
        check_sigma(x, sigma, "ExpertPair")
        high = self.is_high(sigma)
        sides = ((self.high, high), (self.low, ~high))
        needed = any_across_ranks([bool(rows.any()) for _, rows in sides])
        out: torch.Tensor | None = None
        for (expert, rows), run in zip(sides, needed, strict=True):
            if not run:
                continue
            if not bool(rows.any()):
                expert(x[:1], sigma[:1], cond[:1])  # the other ranks' gathers wait for it
                continue
            u = expert(x[rows], sigma[rows], cond[rows])
            if out is None:
                out = u.new_empty((len(x), *u.shape[1:]))
            out[rows] = u.to(out.dtype)
        assert out is not None  # every sample is on one side
        return out


class PhaseGrid:
    """The student starts ``first .. first + steps - 1`` of ``grid`` as indices 0 .. steps - 1:
    what OnlineDistillation and its lanes read of a grid, shifted to one expert's starts."""

    lane_stride = 1

    def __init__(self, grid: StageGrid, first: int, steps: int) -> None:
        self.full = grid
        self.first = first
        self.steps = steps
        self.student = grid.student[first:]

    def next_sigma(self, index: torch.Tensor) -> torch.Tensor:
        return self.full.next_sigma(index + self.first)

    def target(self, teacher: Denoiser, x: torch.Tensor, cond: Conditioning,
               index: torch.Tensor) -> torch.Tensor:
        return self.full.target(teacher, x, cond, index + self.first)


class PhaseDistillation(OnlineDistillation):
    """OnlineDistillation on one expert's starts (``PhaseGrid``); fresh lanes are carried from
    pure noise to the first of them by ``lead_in`` (None: by the stage teacher's targets)."""

    def __init__(self, *, first: int, count: int, lead_in: Denoiser | None,
                 **arguments: Any) -> None:
        self.full_grid: StageGrid = arguments["grid"]
        self.first = first
        self.lead_in = lead_in
        super().__init__(**{**arguments, "grid": PhaseGrid(self.full_grid, first, count)})

    @torch.no_grad()
    def _fresh(self, count: int) -> tuple[torch.Tensor, Conditioning]:
        x, cond = super()._fresh(count)
        grid = self.full_grid
        for position in range(self.first):
            index = torch.full((count,), position, device=self.device)
            with autocast(self.device, self.precision):
                velocity = (grid.target(self.teacher, x, cond, index) if self.lead_in is None
                            else self.lead_in(x, grid.student[index], cond).float())
            x = euler_step(x, velocity, grid.student[index], grid.next_sigma(index))
        return x, cond


def check_pair_stage(run: TrainingRun, sid: StageId) -> None:
    """Refuse, before any work, what a pair stage does not support (yet)."""
    if not run.is_pair or sid.is_teacher:
        return
    cfg, plan = run.config, run.plan(sid)
    what = f"{sid} distils a Wan2.2 expert pair ({cfg.teacher})"
    refusals = (
        (plan.guidance_input, "with a guidance input (a guidance stage); use a chain "
                              "without one, e.g. distill"),
        (plan.jumps is not None or get_chain(sid.chain).objective_factory() is not None,
         f"with the {sid.chain} chain's own objective; use distill or vanilla"),
        (cfg.cuda_graph, "with --cuda-graph (the pair picks experts on the host)"),
        (cfg.log != "none" or bool(cfg.validate_every),
         "with --log / --validate-every; read <stage>/<expert>/metrics.jsonl"),
    )
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"{what}: not supported {why}")


def pair_teacher(run: TrainingRun, sid: StageId,
                 experts: tuple[Denoiser, Denoiser] | None = None
                 ) -> tuple[Denoiser, GuidanceRange]:
    """The previous stage's pair, frozen, as the targets query it: a CFG pair around both
    experts where a scale is not 1, each sample guided by its expert's scale (the stage's
    ``stage_guidance`` above the boundary, ``stage_guidance_2`` below). ``experts``: its
    (high, low) as a LoRA stage runs them on its bases; None: the previous stage's full
    weights, loaded."""
    cfg, plan = run.config, run.plan(sid)
    assert run.boundary is not None and plan.teacher is not None
    if experts is None:
        high, low = (DiTDenoiser(prepare_teacher(model.eval().requires_grad_(False),
                                                 cfg.parallel, cfg.precision, run.device))
                     for model in run.load_stage_experts(plan.teacher))
        experts = high, low
    # Under torchrun a sharded expert's forward is a collective: RankAlignedPair.
    pair = (RankAlignedPair if world().distributed else ExpertPair)(experts[0], experts[1],
                                                                 run.boundary)
    scales = ExpertScales(plan.teacher_guidance, plan.guidance_2)  # type: ignore[arg-type]
    teacher: Denoiser = pair
    if (scales.high, scales.low) != (1.0, 1.0):
        teacher = CFG(pair, run.data.negative.to(run.device), scales)
    # The lanes' w (Conditioning.guidance) is not read: the CFG pair's scales are fixed.
    return teacher, GuidanceRange(scales.high, scales.high)


class PairMetrics:
    """The phases' metrics logs read as one (each record's ``stage`` names its expert)."""

    def __init__(self, logs: list[MetricsLog]) -> None:
        self.logs = logs

    def records(self) -> Iterator[dict[str, Any]]:
        for log in self.logs:
            yield from log.records()


class PairTrainer:
    """A pair's distillation stage as gpd_train.train.pipeline.run_stage drives a
    StageTrainer: ``run``, ``checkpoints.check_recipe``, ``metrics``, ``iterations``,
    ``metadata`` and ``ema.state_dict()`` (both experts' EMA weights, joined)."""

    def __init__(self, run: TrainingRun, sid: StageId) -> None:
        check_pair_stage(run, sid)
        check_fits(run.config, sid.chain)
        plan = run.plan(sid)
        assert run.boundary is not None and plan.teacher is not None
        self.run_folder, self.sid = run, sid
        self.folder = run.stage_folder(sid)
        self.iterations = plan.iterations
        self.phases = expert_phases(stage_grid(run, sid).student[:-1], run.boundary,
                                    plan.iterations)
        self.metadata = {**run.metadata(sid),
                         "teacher_sha256": run.output_sha256(plan.teacher)}
        self.monitor = None  # refused for pairs (check_pair_stage)
        self.metrics = PairMetrics([MetricsLog(self.folder / p.name / "metrics.jsonl")
                                    for p in self.phases])
        self.checkpoints = self  # check_recipe, as a StageTrainer's Checkpointer offers it
        self.ema = self  # state_dict, as a StageTrainer's EMA offers it

    def check_recipe(self) -> None:
        """Refuse resuming a phase under another stage, teacher or recipe (manifests only)."""
        cfg = self.run_folder.config
        for phase in self.phases:
            Checkpointer(self.folder / phase.name / "ckpt", {}, self.metadata, cfg.batch_size,
                         stage_recipe(self.run_folder, self.sid, phase)).check_recipe()

    def _phase_metadata(self, phase: ExpertPhase) -> dict[str, str]:
        recipe = stage_recipe(self.run_folder, self.sid, phase)
        return {**self.metadata, "recipe": json.dumps(recipe, sort_keys=True)}

    def _finished(self, phase: ExpertPhase) -> Path | None:
        """The phase's output when an earlier run finished it for this very recipe."""
        path = self.folder / phase.name / PHASE_OUTPUT
        if not path.is_file():
            return None
        if read_metadata(path) != self._phase_metadata(phase):
            raise CheckpointError(f"{path} was written for another teacher or recipe than "
                                  f"this run's; start the stage over with --restart (moves "
                                  "it aside)")
        return path

    def _expert(self, phase: ExpertPhase) -> WanDiT:
        """The phase's student expert as it starts: the previous stage's."""
        plan = self.run_folder.plan(self.sid)
        assert plan.teacher is not None
        high, low = self.run_folder.load_stage_experts(plan.teacher)
        return high if phase.name == "high" else low

    def _leads_in(self, phase: ExpertPhase) -> bool:
        """Whether the finished high expert carries fresh noise to the phase's first start:
        when the student's rollouts are the states (else the teacher, or no start before)."""
        state_source = self.run_folder.config.chain(self.sid.chain).state_source
        return phase.first > 0 and state_source == "student"

    def _lead_in(self, phase: ExpertPhase) -> Denoiser | None:
        """The finished high expert as the phase's lead-in (``_leads_in``; None: none)."""
        run = self.run_folder
        if not self._leads_in(phase):
            return None
        cfg = run.config
        high = run.new_model()
        high.load_state_dict(load_weights(self.folder / "high" / PHASE_OUTPUT))
        return DiTDenoiser(prepare_teacher(high.eval().requires_grad_(False), cfg.parallel,
                                           cfg.precision, run.device))

    def _lora_models(self, phase: ExpertPhase
                     ) -> tuple[torch.nn.Module, tuple[Denoiser, Denoiser], Denoiser | None]:
        """A LoRA phase's (student, teacher pair's experts, lead-in): each expert is its
        stage-0 base, frozen, carrying the previous stage's adapter as the teacher's (none in
        stage 1: the base is) and a student adapter. The phase's expert trains its student
        adapter; the other's is frozen and, where it leads in (the finished high expert
        before the low phase), holds the high phase's output. So one base per expert serves
        the teacher, the student and the lead-in, and one adapter trains at a time."""
        run, plan = self.run_folder, self.run_folder.plan(self.sid)
        spec, previous = plan.lora, plan.teacher
        assert spec is not None and previous is not None
        bases = run.load_stage_experts(TEACHER, device=torch.device("cpu"))  # cast there
        adapters: tuple[dict[str, torch.Tensor] | None, ...] = (None, None)
        if not previous.is_teacher:
            adapters = expert_adapters(run.load_adapter(previous, spec), bases[0], spec,
                                       run.stage_folder(previous) / OUTPUT)
        views, student, lead_in = [], None, None
        for name, base, adapter in zip(EXPERTS, bases, adapters, strict=True):
            lora = lora_stage_model(base, spec, adapter, run.config.precision,
                                    device=run.device)
            views.append(AdapterDenoiser(lora.model, lora.adapter))
            if name == phase.name:
                student = lora.model
                continue
            lora.model.requires_grad_(False)
            if name == "high" and self._leads_in(phase):
                set_adapter_weights(lora.model, STUDENT,
                                    load_weights(self.folder / "high" / PHASE_OUTPUT))
                lead_in = AdapterDenoiser(lora.model, STUDENT)
            # After its weights are set: sharding turns the parameters into DTensors. The
            # views above hold the model itself, which is sharded and split in place.
            prepare_teacher(lora.model, run.config.parallel, run.config.precision, run.device)
        assert student is not None
        return student, (views[0], views[1]), lead_in

    def _initial_weights(self, phase: ExpertPhase) -> dict[str, torch.Tensor]:
        """The phase's student as it starts (kept as its output where it has no start)."""
        if self.run_folder.plan(self.sid).lora is None:
            return {k: v.detach().float() for k, v in self._expert(phase).state_dict().items()}
        student = self._lora_models(phase)[0]
        return adapter_from_params({k: v.detach().float() for k, v in
                                    student.named_parameters() if v.requires_grad})

    def _phase_trainer(self, phase: ExpertPhase) -> StageTrainer:
        run, sid = self.run_folder, self.sid
        cfg, plan = run.config, run.plan(sid)
        if plan.lora is None:
            teacher, guidance = pair_teacher(run, sid)
            student, lead_in = self._expert(phase), self._lead_in(phase)
        else:
            student, experts, lead_in = self._lora_models(phase)
            teacher, guidance = pair_teacher(run, sid, experts)
        chain_cfg = cfg.chain(sid.chain)
        setup = DistillSetup(student=student, teacher=teacher, data=run.data,
                             grid=stage_grid(run, sid), guidance=guidance, chain=chain_cfg,
                             freq_weight=plan.freq_weight, device=run.device,
                             precision=cfg.precision)

        def make(generator: torch.Generator, batch_size: int) -> PhaseDistillation:
            return PhaseDistillation(first=phase.first, count=phase.count, lead_in=lead_in,
                                     **online_arguments(setup, generator, batch_size))

        # Both phases draw the stage's stream from its start (they train different experts).
        objective, generator = stream_objectives(stage_generator(run, sid), cfg.batch_size,
                                                 cfg.parallel, make)
        return stage_trainer(run, sid, student, objective, chain_cfg, generator,
                        self.metadata["teacher_sha256"], phase)

    def run(self, resume: bool) -> None:
        """Train each expert's phase in turn (a finished one is kept), writing its EMA
        weights to ``<stage>/<expert>/expert.safetensors``."""
        for phase in self.phases:
            if self._finished(phase) is not None:
                continue
            if phase.iterations == 0:  # no start on its side: it stays the previous expert
                weights = self._initial_weights(phase)
            else:
                trainer = self._phase_trainer(phase)
                trainer.run(resume=resume)
                weights = trainer.ema.state_dict()
                if self.run_folder.plan(self.sid).lora is not None:
                    weights = adapter_from_params(weights)  # the adapter alone, as one stage's
                del trainer  # its optimizer state, before the next phase builds its own
            # Rank 0 writes it; main_only returns once it is written, so that every rank
            # then reads it (the next phase's lead-in, the stage output).
            main_only(_write_phase, self.folder / phase.name / PHASE_OUTPUT,
                      gathered_on_main(weights), self._phase_metadata(phase))

    def expert_summaries(self) -> dict[str, dict[str, Any]]:
        """Each expert's phase for done.json: its starts, iterations, final loss (mean of
        the last 20) and loss curve (the mean loss of each tenth of the phase)."""
        summaries = {}
        for phase, log in zip(self.phases, self.metrics.logs, strict=True):
            losses = [record["loss"] for record in log.records()]
            tenths = [losses[len(losses) * k // 10:len(losses) * (k + 1) // 10]
                      for k in range(10)]
            summaries[phase.name] = {
                "starts": [phase.first, phase.count], "iterations": phase.iterations,
                "final_loss_mean20": sum(losses[-20:]) / max(1, len(losses[-20:])),
                "loss_curve": [sum(part) / len(part) for part in tenths if part]}
        return summaries

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Both experts' finished weights, joined as the stage output stores them; empty
        on ranks > 0 (rank 0 writes the output: the other ranks need no host copy of two
        full experts each)."""
        if not is_main():
            return {}
        states = [load_weights(self.folder / phase.name / PHASE_OUTPUT)
                  for phase in self.phases]
        return join_experts(*states)


def _write_phase(path: Path, weights: dict[str, torch.Tensor],
                 metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, weights, metadata)


def build_pair_distill(run: TrainingRun, sid: StageId) -> PairTrainer:
    """Stage ``sid`` of a pair run (gpd_train.train.pipeline.run_stage drives it)."""
    return PairTrainer(run, sid)
