"""The one reader (and record writer) of a run folder's stages.

``RunFolder`` is handed a run configuration and answers what the trainer, the evaluation,
the sampler and the export ask of a run folder: where a stage lives, whether it is
complete and current (its stage teacher unchanged since), what shaped it, and its model,
verified against the SHA-256 in its done.json (a LoRA adapter merged into stage 0, a
guidance input kept or folded at a CFG scale). It builds no data set and no trainer.

Layout of a run folder::

    config.json                  the configuration of the last invocation
    stage0/                      the base teacher T0 (trained or imported)
    guidance/                    the guidance stage's w-conditioned student (when enabled)
    stage1/ stage2/ stage3/      the GPD chain (students S_1..S_3)
    guided/guidance/ guided/stage1/ ...  the guided chain: guidance stage, then halving
    vanilla/stage1/ ...          the vanilla progressive-distillation ablation chain
    eval/                        report.md, report.json, contact_sheet.png, *.gif

A run whose teacher is a Wan2.2 folder stores each stage as an expert pair
(gpd_train.run.experts). Each stage folder holds ``model.safetensors`` (the stage output:
the EMA weights),
``done.json`` (written last: the stage is complete; its SHA-256, its stage teacher's and
the options that shaped it, see gpd_train.run.records), ``metrics.jsonl``, ``ckpt/`` and,
for full-weight stages, ``diffusers/`` (the output as a diffusers model folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gpd_model import (
    DiTConfig,
    WanDiT,
    add_guidance_input,
    fold_guidance,
    get_preset,
    has_guidance_input,
    save_diffusers,
)
from gpd_train.config.chains import DEFAULT_CHAIN, StageId
from gpd_train.config.checks import resolve_device
from gpd_train.config.plan import StagePlan, stage_plan
from gpd_train.config.settings import LoraSpec, RunConfig
from gpd_train.errors import GPDError
from gpd_train.run.checkpoint_store import MANIFEST, CheckpointStore
from gpd_train.run.destination import claim
from gpd_train.run.experts import BOUNDARY_KEY, COMPONENT, EXPERTS, split_experts
from gpd_train.run.files import (
    GUIDANCE_INPUT_KEY,
    atomic_write_text,
    load_exact,
    load_stage_output,
    load_weights,
    read_metadata,
    save_weights,
    sha256_file,
)
from gpd_train.run.lora import METADATA_KEY, expert_adapters, merge_adapter
from gpd_train.run.records import (
    OPTIONS_KEY,
    OUTPUT,
    RECORD,
    RunFolderError,
    StaleStageError,
    read_record,
    verify_output,
)
from gpd_train.run.wan_folder import expert_folders, teacher_dit_config

TEACHER = StageId(DEFAULT_CHAIN, 0)
DIFFUSERS_FOLDER = "diffusers"


class MissingStageError(GPDError, RuntimeError):
    """A stage's input (the previous stage's output) is not in the run folder."""


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


class RunFolder:
    """The stages of the run folder ``config.run_dir``; models load onto ``device``
    (default: the config's device)."""

    def __init__(self, config: RunConfig, device: torch.device | None = None,
                 dit_config: DiTConfig | None = None) -> None:
        """``dit_config``: the model's shape, where the caller has its own; else a Diffusers
        teacher folder states it (any Wan2.1 size), else the configured preset."""
        self.config = config
        self.folder = Path(config.run_dir)
        self.device = device or resolve_device(config.device)
        self.dit_config: DiTConfig = (dit_config or teacher_dit_config(config.teacher)
                                      or get_preset(config.preset))
        # A Wan2.2 teacher folder makes every stage an expert pair (gpd_train.run.experts).
        experts = None if config.teacher is None else expert_folders(config.teacher)
        self.boundary: float | None = None if experts is None else experts.boundary

    # -- where stages are and what they are ----------------------------------------------
    def stage_folder(self, sid: StageId) -> Path:
        return sid.folder(self.folder)

    def command(self, sid: StageId) -> str:
        """The command line that (re)runs a stage of this run folder."""
        default = str(self.folder) == RunConfig.run_dir
        return sid.command(None if default else self.folder)

    def plan(self, sid: StageId) -> StagePlan:
        """The stage's plan (gpd_train.config.plan) under this run's configuration."""
        return stage_plan(self.config, sid)

    @property
    def is_pair(self) -> bool:
        """Whether the run's stages are Wan2.2 expert pairs."""
        return self.boundary is not None

    def checkpoint_folders(self, sid: StageId) -> list[Path]:
        """Where the stage's checkpoints are: ``ckpt/``, or one per expert phase of a pair's
        distillation stage."""
        folder = self.stage_folder(sid)
        if self.is_pair and not sid.is_teacher:
            return [folder / name / "ckpt" for name in EXPERTS]
        return [folder / "ckpt"]

    def has_guidance_stage(self, chain: str) -> bool:
        return self.config.chain(chain).guidance_stage

    def previous_stage(self, sid: StageId) -> StageId:
        """The stage whose output is this stage's teacher and the student's start."""
        return sid.previous(self.has_guidance_stage(sid.chain))

    def guidance_input(self, sid: StageId) -> bool:
        """Whether the stage's model takes w as an input (the guidance stage and after)."""
        return self.plan(sid).guidance_input

    def lora_spec(self, sid: StageId) -> LoraSpec | None:
        """The LoRA spec the stage trains with; None: full weights (always for stage 0)."""
        return self.plan(sid).lora

    def stage_options(self, sid: StageId) -> dict[str, Any]:
        """What shaped the stage (its plan's options), with a pair's distillation stage's
        low-expert teacher CFG scale (``guidance_2``; ``guidance`` is the high one's)."""
        options = self.plan(sid).options()
        guidance_2 = self.plan(sid).guidance_2
        if self.is_pair and guidance_2 is not None:
            options["guidance_2"] = guidance_2
        return options

    def steps(self, sid: StageId) -> int:
        """The stage's sampling steps (its plan's)."""
        return self.plan(sid).steps

    def metadata(self, sid: StageId) -> dict[str, str]:
        """The safetensors metadata of the stage's output and checkpoints."""
        spec = self.lora_spec(sid)
        lora = {} if spec is None else {METADATA_KEY: spec.to_metadata()}
        pair = {} if self.boundary is None else {BOUNDARY_KEY: repr(self.boundary)}
        return {"format": "gpd_train", "stage": sid.name,
                "dit_config": self.dit_config.to_json(),
                GUIDANCE_INPUT_KEY: str(int(self.guidance_input(sid))), **lora, **pair}

    # -- records and provenance ---------------------------------------------------------
    def is_done(self, sid: StageId) -> bool:
        folder = self.stage_folder(sid)
        return (folder / RECORD).is_file() and (folder / OUTPUT).is_file()

    def record(self, sid: StageId) -> dict[str, Any]:
        """The finished stage's done.json (its summary and provenance)."""
        return read_record(self.stage_folder(sid))

    def output_sha256(self, sid: StageId) -> str:
        """The recorded SHA-256 of a finished stage's output (hashed when not recorded)."""
        return self.record(sid).get("sha256") or sha256_file(
            self.stage_folder(sid) / OUTPUT)

    def stale_reason(self, sid: StageId) -> str | None:
        """Why a finished stage no longer follows from its stage teacher (None: it does).

        A stage is stale when the teacher it recorded is gone, stale itself, another stage
        (e.g. a guidance stage was switched on) or has another SHA-256 (retrained). Stage
        records from before provenance was kept carry no teacher hash and are trusted.
        """
        if sid.is_teacher:
            return None
        recorded = self.record(sid)
        if "teacher_sha256" not in recorded:
            return None
        previous = self.previous_stage(sid)
        if recorded.get("teacher") != previous.name:
            return (f"it was distilled from {recorded.get('teacher')}, this run's stage teacher "
                    f"is {previous}")
        if not self.is_done(previous):
            return f"its stage teacher {previous} is no longer complete"
        reason = self.stale_reason(previous)
        if reason is not None:
            return f"its stage teacher {previous} is stale ({reason})"
        current = self.output_sha256(previous)
        if current != recorded["teacher_sha256"]:
            return (f"its stage teacher {previous} changed since (SHA-256 "
                    f"{recorded['teacher_sha256'][:12]}... then, {current[:12]}... now)")
        return None

    def partial_stale_reason(self, sid: StageId) -> str | None:
        """Why an unfinished stage's checkpoints no longer follow from its stage teacher
        (None: they do, there are none, or they record no teacher or cannot be read, which
        resuming reports itself)."""
        newest = [path for folder in reversed(self.checkpoint_folders(sid))  # latest phase
                  for path in CheckpointStore(folder).candidates()]
        if sid.is_teacher or self.is_done(sid) or not newest:
            return None
        previous = self.previous_stage(sid)
        if not self.is_done(previous):
            return None
        try:
            manifest = json.loads((newest[0] / MANIFEST).read_text())
            saved = manifest["metadata"]["teacher_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        current = self.output_sha256(previous)
        if saved == current:
            return None
        return (f"its checkpoints ({newest[0].name}) were written under its stage teacher "
                f"{previous} at SHA-256 {saved[:12]}..., which is now {current[:12]}...")

    def _check_grid(self, sid: StageId, recorded: dict[str, Any]) -> None:
        """A distilled stage samples only on the grid it learned (shift and steps)."""
        options = recorded.get("options")
        if sid.is_teacher or not isinstance(options, dict):
            return  # the teacher samples at any grid; old records carry no options
        plan = self.plan(sid)
        want = {"shift": plan.shift, "steps": plan.steps}
        for key, value in want.items():
            if key in options and options[key] != value:
                raise RunFolderError(
                    f"{sid} was distilled with {key} {options[key]} "
                    f"({self.stage_folder(sid) / RECORD}); this run asks for "
                    f"{key} {value}. Drop the option that changed it (--shift, steps), or "
                    "train another --run-dir")
        learned = options.get("guidance")
        if self.guidance_input(sid) and isinstance(learned, list):
            low, high = self.config.chain(sid.chain).guidance_range
            if low < learned[0] or high > learned[1]:  # its students would be taught there
                raise RunFolderError(
                    f"{sid} learned CFG scales {learned[0]:g}..{learned[1]:g} "
                    f"({self.stage_folder(sid) / RECORD}); this run asks for "
                    f"--guidance-range {low:g} {high:g}, outside them. Give a range within "
                    f"{learned[0]:g}..{learned[1]:g}, or retrain {sid} on the wider one with "
                    f"`{self.command(sid)} --restart --guidance-range {low:g} {high:g}`")

    def kept_changes(self, sid: StageId) -> list[str]:
        """What this run asks of a finished stage that its done.json says it was not trained
        with (what --resume would otherwise keep silently): its iterations, and for a
        distilled stage the options that shaped it (grid, guidance, LoRA, ...). Records from
        before options were kept are not compared."""
        recorded = self.record(sid)
        want: dict[str, Any] = {"iterations": self.plan(sid).iterations}
        if not sid.is_teacher:  # the teacher samples at any grid and CFG scale
            want.update(self.stage_options(sid))
        want = json.loads(json.dumps(want))  # as done.json reads back
        options = recorded.get("options")
        had = {**(options if isinstance(options, dict) else {}),
               "iterations": recorded.get("iterations")}
        return [f"{key} {had[key]!r} in {self.stage_folder(sid) / RECORD}, {value!r} in "
                "this run" for key, value in want.items()
                if had.get(key) is not None and had[key] != value]

    def verified_output(self, sid: StageId, check_grid: bool = True
                        ) -> tuple[Path, dict[str, str]]:
        """(path, metadata) of a finished, current stage's output that verifies."""
        if not self.is_done(sid):
            raise MissingStageError(
                f"{sid} is not complete in {self.folder} (no "
                f"{self.stage_folder(sid) / RECORD}); run `{self.command(sid)}` first")
        reason = self.stale_reason(sid)
        if reason is not None:
            raise StaleStageError(f"{sid} is stale: {reason}; retrain it with "
                                  f"`{self.command(sid)} --restart`")
        if check_grid:
            self._check_grid(sid, self.record(sid))
        verify_output(self.stage_folder(sid))
        path = self.stage_folder(sid) / OUTPUT
        meta = read_metadata(path)
        expected = self.metadata(sid)["dit_config"]
        if meta.get("dit_config") != expected:
            raise RunFolderError(
                f"{path} was written for model config {meta.get('dit_config')}, this run "
                f"uses {expected} (preset {self.config.preset!r})")
        return path, meta

    # -- models ---------------------------------------------------------------------------
    def new_model(self, device: torch.device | None = None) -> WanDiT:
        torch.manual_seed(self.config.seed)  # the initialisation is part of the run's seed
        return WanDiT(self.dit_config).to(device or self.device)

    def load_stage_model(self, sid: StageId, fold_at: float | None = None,
                         check_grid: bool = True, device: torch.device | None = None) -> WanDiT:
        """The output (EMA weights) of a finished, current stage, verified against the
        SHA-256 in its done.json; a clear error when it is missing, stale or corrupt.

        A LoRA stage's adapter is merged into stage 0, the base it was trained on. A model
        with a guidance input (the guidance stage and the students after it) keeps it, or
        with ``fold_at`` = w becomes a plain Wan2.1 model sampling at that CFG scale.
        ``check_grid`` refuses a distilled stage whose shift/steps differ from this run's
        (callers that take the grid from the stage record, like the sampler, skip it).
        ``device`` overrides the folder's (e.g. the CPU, to cast before moving).
        """
        path, meta = self.verified_output(sid, check_grid)
        if BOUNDARY_KEY in meta:
            raise RunFolderError(f"{path} holds a Wan2.2 expert pair (boundary sigma "
                                 f"{meta[BOUNDARY_KEY]}), not one model: load both experts "
                                 "(RunFolder.load_stage_experts)")
        if METADATA_KEY in meta:
            spec = LoraSpec.from_metadata(meta[METADATA_KEY], path)
            model = merge_adapter(self.load_stage_model(TEACHER, device=device),
                                  load_weights(path), spec, path)
        else:
            model = load_stage_output(self.new_model(device), path, meta)
        if fold_at is not None and has_guidance_input(model):
            return fold_guidance(model, fold_at)
        return model

    def load_stage_experts(self, sid: StageId, check_grid: bool = True,
                           device: torch.device | None = None) -> tuple[WanDiT, WanDiT]:
        """(high, low) experts of a pair run's finished, current stage, verified as
        ``load_stage_model`` verifies one model; a LoRA pair stage's adapters merged each into
        its expert of stage 0."""
        path, meta = self.verified_output(sid, check_grid)
        if meta.get(BOUNDARY_KEY) != repr(self.boundary):
            raise RunFolderError(f"{path} holds boundary sigma {meta.get(BOUNDARY_KEY)} "
                                 f"(metadata {BOUNDARY_KEY}), this run's teacher has "
                                 f"{self.boundary}: retrain it with "
                                 f"`{self.command(sid)} --restart`")
        if METADATA_KEY in meta:  # a LoRA pair: each expert's adapter merged into stage 0's
            spec = LoraSpec.from_metadata(meta[METADATA_KEY], path)
            bases = self.load_stage_experts(TEACHER, device=device)
            adapters = expert_adapters(load_weights(path), bases[0], spec, path)
            high, low = (merge_adapter(base, adapter, spec, f"{path} ({name} expert)")
                         for name, base, adapter in zip(EXPERTS, bases, adapters, strict=True))
            return high, low
        models = []
        for state in split_experts(load_weights(path), path):
            model = self.new_model(device)
            load_exact(model, state, path)
            models.append(model)
        return models[0], models[1]

    def stage_adapter(self, sid: StageId, check_grid: bool = True
                      ) -> tuple[LoraSpec, dict[str, torch.Tensor]] | None:
        """(spec, adapter) of a finished LoRA stage, verified; None for full weights."""
        path, meta = self.verified_output(sid, check_grid)
        if METADATA_KEY not in meta:
            return None
        return LoraSpec.from_metadata(meta[METADATA_KEY], path), load_weights(path)

    def load_adapter(self, sid: StageId, spec: LoraSpec) -> dict[str, torch.Tensor]:
        """The adapter a finished LoRA stage trained under ``spec`` (the next LoRA stage's
        teacher); refused when the stage holds full weights or another spec."""
        found = self.stage_adapter(sid)
        command = self.command(sid)
        if found is None:
            raise RunFolderError(
                f"{sid} holds full weights ({self.stage_folder(sid)}), but this stage "
                f"trains LoRA adapters on stage 0 (lora_rank {spec.rank}): a LoRA chain is LoRA "
                f"from its stage 1. Retrain {sid} with the same LoRA options (`{command} "
                f"--restart --lora-rank {spec.rank}`) or train this stage without --lora-rank")
        saved, adapter = found
        if saved != spec:
            raise RunFolderError(
                f"{sid} was trained with LoRA rank {saved.rank}, alpha {saved.alpha:g}, "
                f"targets {list(saved.targets)}; this stage asks for rank {spec.rank}, alpha "
                f"{spec.alpha:g}, targets {list(spec.targets)}. A stage starts from its "
                f"teacher's adapter: use the same LoRA options, or retrain {sid} with "
                f"`{command} --restart`")
        return adapter

    # -- writing ----------------------------------------------------------------------------
    def finish_stage(self, sid: StageId, weights: dict[str, torch.Tensor],
                     summary: dict[str, Any]) -> Path:
        """Write the stage output (and, for full weights, its diffusers folder), then
        done.json with its provenance (``summary`` may carry ``teacher_sha256``, the
        teacher hash the stage started from). One process and torchrun's rank 0 alike."""
        folder = self.stage_folder(sid)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RECORD).unlink(missing_ok=True)
        output = folder / OUTPUT
        options = self.stage_options(sid)
        # Also inside the output, which done.json's SHA-256 covers: a hand edit is detected.
        save_weights(output, weights, {**self.metadata(sid),
                                       OPTIONS_KEY: json.dumps(options, sort_keys=True)})
        lora = self.lora_spec(sid) is not None  # an adapter is exported by gpd_train.export
        if self.is_pair and not lora:  # each expert as its WanPipeline component
            for name, state in zip(EXPERTS, split_experts(weights, output), strict=True):
                export_diffusers(self.dit_config, state, folder / DIFFUSERS_FOLDER /
                                 COMPONENT[name], self.config.resolved_guidance)
        elif not lora:
            export_diffusers(self.dit_config, weights, folder / DIFFUSERS_FOLDER,
                             self.config.resolved_guidance)
        record = {"options": options, **summary, "sha256": sha256_file(output)}
        if not sid.is_teacher:
            previous = self.previous_stage(sid)
            record["teacher"] = previous.name
            record.setdefault("teacher_sha256", self.output_sha256(previous))
        atomic_write_text(folder / RECORD, json.dumps(record, indent=1, sort_keys=True))
        return output

    def save_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        claim(self.folder)
        atomic_write_text(self.folder / "config.json", self.config.to_json())
