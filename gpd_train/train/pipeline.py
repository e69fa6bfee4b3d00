"""The order of a run's stages, and running one: check the folder, train (or import
stage 0), write the output. Stages live in the run folder as gpd_train.run.folder describes;
how each stage's trainer is built is gpd_train.train.builders'.

A stage is never deleted: ``--restart`` moves it aside to ``<stage>.old-<time>/``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gpd_model import load_checkpoint
from gpd_train.config.chains import GUIDANCE_STAGE, StageId
from gpd_train.config.settings import RunConfig
from gpd_train.data.needs import missing_latents, trainable_chains
from gpd_train.errors import ConfigError
from gpd_train.eval.evaluate import evaluate_run
from gpd_train.parallel import gathered_on_main, is_main, main_only, world
from gpd_train.run.experts import join_experts
from gpd_train.run.files import CheckpointError
from gpd_train.run.folder import TEACHER, RunFolder
from gpd_train.run.lora import adapter_from_params
from gpd_train.run.records import (
    OUTPUT,
    RunFolderError,
    StageExistsError,
    StaleStageError,
    move_aside,
    verify_output,
)
from gpd_train.run.wan_folder import expert_folders, transformer_folder
from gpd_train.train.builders import TrainingRun, build_distill, build_stage0, check_cuda_graph
from gpd_train.train.monitor import stage_monitor
from gpd_train.train.pair import PairTrainer, build_pair_distill, check_pair_stage


def prepare_stage_folder(run: RunFolder, sid: StageId, resume: bool,
                         restart: bool) -> Path | None:
    """Refuse to overwrite a stage unless asked; returns the finished output to keep, if any.

    ``restart`` moves the stage folder aside; ``resume`` continues its checkpoints (a
    finished, current stage is kept as it is). Without either, a stage holding checkpoints
    or an output is refused, naming both choices.
    """
    folder, name, command = run.stage_folder(sid), sid.name, run.command(sid)
    if restart:
        if not sid.is_teacher:  # a refused restart must not have moved anything
            run.verified_output(run.previous_stage(sid))
        moved = main_only(move_aside, folder)
        if moved is not None:
            tqdm.write(f"[{name}] --restart: moved the old stage to {moved}")
        return None
    if run.is_done(sid):
        reason = run.stale_reason(sid)
        if reason is not None:
            raise StaleStageError(f"{name} is stale: {reason}; retrain it with "
                                  f"`{command} --restart` (moves {folder} aside)")
        if resume:
            check_kept_output(folder, name, command)
            changed = run.kept_changes(sid)
            if changed:  # as a partial stage's checkpoint refuses them
                raise RunFolderError(
                    f"{name} is complete but was trained with other options than this run: "
                    f"{'; '.join(changed)}. Keep it by dropping the flags or TOML keys that "
                    f"changed them, or retrain it with `{command} --restart` (moves it aside)")
            tqdm.write(f"[{name}] already complete ({folder / OUTPUT}); kept")
            return folder / OUTPUT
        raise StageExistsError(
            f"{name} is already complete ({folder / OUTPUT}); to train it again "
            f"run `{command} --restart` (moves it aside to {folder.name}.old-<time>/)")
    held = [(ckpt, sorted(ckpt.glob("step-*"))) for ckpt in run.checkpoint_folders(sid)]
    held = [(ckpt, found) for ckpt, found in held if found]
    if held and not resume:
        ckpt, checkpoints = held[-1]
        raise StageExistsError(
            f"{name} has checkpoints up to {checkpoints[-1].name} in {ckpt}; run "
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


def finish_stage(run: RunFolder, sid: StageId, ema_state: dict[str, torch.Tensor],
                 summary: dict[str, Any]) -> Path:
    """The stage output from the (possibly sharded) EMA: under torchrun gathered to rank 0
    one tensor at a time (peak: one full tensor), which writes it as one process does."""
    if not world().distributed:
        return run.finish_stage(sid, ema_state, summary)
    return main_only(run.finish_stage, sid, gathered_on_main(ema_state), summary)


def run_stage(run: TrainingRun, sid: StageId, resume: bool, restart: bool = False) -> Path:
    """Train (or import, for stage 0 with a teacher path) one stage; returns its output."""
    started = time.perf_counter()
    reason = missing_latents(run.config, run.data, sid)
    if reason is not None:  # before the stage folder is touched
        raise ConfigError(f"{sid} cannot train: {reason}")
    kept = prepare_stage_folder(run, sid, resume, restart)
    if kept is not None:
        return kept
    if sid.is_teacher and run.config.teacher is not None:
        run.save_config()
        return main_only(import_teacher, run, run.config.teacher)  # one reader/writer
    check_cuda_graph(run, sid)  # before loading anything
    if sid.is_teacher:
        trainer = build_stage0(run)
    else:
        trainer = build_pair_distill(run, sid) if run.is_pair else build_distill(run, sid)
    if resume:
        trainer.checkpoints.check_recipe()
    trainer.monitor = stage_monitor(run, sid, run.data)  # --log / --validate-every
    main_only(run.save_config)  # only once the stage's inputs and options were accepted
    trainer.run(resume=resume)
    final = list(trainer.metrics.records())[-20:]
    summary = {"stage": sid.name, "iterations": trainer.iterations,
               "final_loss_mean20": sum(r["loss"] for r in final) / max(1, len(final)),
               "seconds": time.perf_counter() - started, "steps": run.steps(sid)}
    if "teacher_sha256" in trainer.metadata:
        summary["teacher_sha256"] = trainer.metadata["teacher_sha256"]
    if isinstance(trainer, PairTrainer):
        summary["experts"] = trainer.expert_summaries()
    weights = trainer.ema.state_dict()
    if run.lora_spec(sid) is not None and not isinstance(trainer, PairTrainer):
        weights = adapter_from_params(weights)  # a LoRA stage's output is its adapter alone
        # (a pair's phases wrote their adapters so already)
    output = finish_stage(run, sid, weights, summary)
    tqdm.write(f"[{sid}] done in {summary['seconds']:.0f} s -> {output}")
    return output


def import_teacher(run: RunFolder, path: str) -> Path:
    """Stage 0 from pretrained Wan2.1 weights (either key format) through gpd_model, or
    from a Wan2.2 folder's two experts (one output, gpd_train.run.experts)."""
    experts = expert_folders(path)
    if experts is None:
        model = run.new_model()
        load_checkpoint(model, transformer_folder(path) or path)
        weights = model.state_dict()
    else:
        states = []
        for folder in (experts.high, experts.low):  # one expert in memory at a time
            model = run.new_model(torch.device("cpu"))
            load_checkpoint(model, folder)
            states.append(model.state_dict())
        weights = join_experts(*states)
    output = run.finish_stage(TEACHER, weights, {
        "stage": TEACHER.name, "imported_from": str(path), "steps": run.config.steps[0]})
    tqdm.write(f"[{TEACHER}] imported {path} -> {output}")
    return output


def pipeline_plan(config: RunConfig) -> list[StageId]:
    """Every stage of the embedded pipeline in order: T0, then each of ``pipeline_chains``."""
    plan = [TEACHER]
    for chain in config.pipeline_chains:
        if config.chain(chain).guidance_stage:
            plan.append(StageId(chain, GUIDANCE_STAGE))
        plan += [StageId(chain, k) for k in range(1, config.stage_count(chain) + 1)]
    return plan


def trainable_plan(run: TrainingRun) -> tuple[list[StageId], TrainingRun]:
    """The pipeline's stages that can train on the run's data set, and the run to evaluate
    (its pipeline_chains the chains that train); prints one line per chain skipped."""
    full = pipeline_plan(run.config)
    chains, notes = trainable_chains(run.config, run.data,
                                     [sid for sid in full if not run.is_done(sid)])
    for note in notes:
        tqdm.write(note)
    plan = [sid for sid in full if sid.is_teacher or sid.chain in chains]
    if chains == run.config.pipeline_chains:
        return plan, run
    return plan, TrainingRun(dataclasses.replace(run.config, pipeline_chains=chains))


def run_pipeline(config: RunConfig, resume: bool = True, evaluate: bool = True) -> Path | None:
    """All stages that can train on the data set (skipping complete ones, resuming partial
    ones), then the evaluation of those."""
    run = TrainingRun(config)
    plan, evaluated = trainable_plan(run)  # before anything trains
    for sid in plan:
        check_cuda_graph(run, sid)  # every stage, before the first trains
        check_pair_stage(run, sid)
    for sid in plan:
        if run.is_done(sid):
            reason = run.stale_reason(sid)
            if reason is None:
                tqdm.write(f"[{sid}] already complete, skipped")
                continue
            tqdm.write(f"[{sid}] stale: {reason}; retraining it")
            run_stage(run, sid, resume=False, restart=True)
            continue
        reason = run.partial_stale_reason(sid)
        if reason is not None:
            tqdm.write(f"[{sid}] stale: {reason}; moving it aside and training it again")
            run_stage(run, sid, resume=False, restart=True)
            continue
        run_stage(run, sid, resume=resume)
    if not evaluate or not is_main():  # under torchrun rank 0 evaluates alone
        return None
    return evaluate_run(evaluated, evaluated.data)
