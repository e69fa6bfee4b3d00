"""Command line: ``python -m gpd_train [--stage N | --eval | --all] [options]``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from typing import Any

from gpd_train import parallel
from gpd_train.config.chains import (
    CHAINS,
    DEFAULT_CHAIN,
    DEFAULT_PIPELINE,
    GUIDANCE_STAGE,
    StageId,
    add_chain_argument,
)
from gpd_train.config.load import fit_stage_lists, read_settings, resolve
from gpd_train.config.plan import stage_plan
from gpd_train.config.settings import DEFAULT_STEPS, STATE_SOURCES, RunConfig
from gpd_train.data.encode_prompts import (
    VIDEO_DEFAULTS,
    check_prompts_teacher,
    encode_for_run,
    negative_text,
)
from gpd_train.errors import ConfigError
from gpd_train.eval.evaluate import evaluate_run
from gpd_train.run import preflight
from gpd_train.run.destination import RUN, check_destination
from gpd_train.run.records import OUTPUT, RECORD, RunLock, check_run_paths
from gpd_train.run.wan_folder import with_teacher_defaults
from gpd_train.run.writes import COMMAND_ERRORS, command_failed
from gpd_train.train import threads
from gpd_train.train.builders import TrainingRun
from gpd_train.train.monitor import check_log_backend
from gpd_train.train.pipeline import run_pipeline, run_stage, trainable_plan

EPILOG = f"""\
With no action the embedded pipeline runs: stage 0 (teacher), then the stages of each chain
of pipeline_chains (default {", ".join(DEFAULT_PIPELINE)}; registered:
{", ".join(CHAINS)}; set it in a --config file), then the evaluation; complete stages are
skipped and partial ones resumed.
Run-folder layout and TOML keys: see gpd_train/run/folder.py and gpd_train/config/settings.py.
Examples:
  python -m gpd_train                      # everything, tiny preset, runs/default/
  python -m gpd_train --stage 1 --resume   # continue GPD stage 1 from its last checkpoint
  python -m gpd_train --stage 1 --restart  # train it again (the old stage1/ is moved aside)
  python -m gpd_train --stage 0 --preset wan2.1-t2v-1.3b --teacher /ckpt/Wan2.1-T2V-1.3B \\
      --data /data/prompt-embeddings --run-dir runs/wan
  torchrun --nproc_per_node 8 -m gpd_train --stage 1 ...   # the same command on 8 GPUs
"""


def _stage_id(text: str) -> int | str:
    if text == GUIDANCE_STAGE:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a stage number or {GUIDANCE_STAGE!r} (the guidance stage), got {text!r}"
        ) from None


def _parse_compare(items: list[str]) -> dict[str, str]:
    compare: dict[str, str] = {}
    for item in items:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise ConfigError(f"--compare takes LABEL=RUN_DIR, got {item!r}")
        if label in compare:
            raise ConfigError(f"--compare label {label!r} given twice ({compare[label]} and "
                             f"{folder}): each row needs its own label")
        compare[label] = folder
    return compare


# Flags that set one configuration key: (flag, key, type, help).
CONFIG_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--run-dir", "run_dir", str, "run folder (default runs/default)"),
    ("--preset", "preset", str, "gpd_model preset (default tiny)"),
    ("--task", "task", str, "t2v | i2v: image-to-video from each built-in video's first "
     "frame (with --preset tiny-i2v or tiny-ti2v)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--threads", "threads", int, "CPU threads for torch (0 = torch's default, fewer when "
     "other processes keep cores busy)"),
    ("--precision", "precision", str, "fp32 | bf16 (bf16 autocast on CUDA)"),
    ("--seed", "seed", int, "seed of data, initialisation and noise"),
    ("--data", "data", str, "prompt-embedding data set folder (default: built-in videos)"),
    ("--teacher", "teacher", str, "import stage 0 from Wan2.1 weights at this path (a "
     "Wan2.1-T2V-Diffusers folder gives the model shape itself: no --preset needed)"),
    ("--prompts", "prompts", str, "prompts file (one per line) that the --teacher folder's "
     "umT5 encodes into <run-dir>/prompt-embeddings (instead of --data)"),
    ("--shift", "shift", float, "sigma-grid shift (tiny default 3.0, else 5.0)"),
    ("--guidance", "guidance", float, "the teacher's CFG scale (tiny default 1.5, else 5.0)"),
    ("--batch-size", "batch_size", int, "training batch size"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint interval in iterations"),
    ("--log", "log", str, "none | tensorboard: also log each stage's scalars (and the "
     "validation samples) to <stage folder>/tensorboard (needs the [tensorboard] extra)"),
    ("--validate-every", "validate_every", int, "every N iterations the EMA student samples "
     "fixed prompts and noise at its step count: <stage folder>/validation/step-N.png "
     "(and TensorBoard with --log tensorboard); 0 = never (default)"),
    ("--teacher-iterations", "stage0.iterations", int, "stage-0 training iterations"),
    ("--state-source", "distill.state_source", str,
     f"GPD state source: {' | '.join(STATE_SOURCES)}"),
    ("--lr", "distill.lr", float, "distillation learning rate"),
    ("--lora-rank", "distill.lora_rank", int, "train rank-R LoRA adapters on the frozen "
     "stage-0 base instead of full weights (GPD stages; 0 = full weights)"),
    ("--lora-alpha", "distill.lora_alpha", float, "LoRA alpha: the update is alpha/rank * "
     "B A (default: the rank)"),
    ("--data-streams", "parallel.data_streams", int,
     "data streams over all ranks (default one per rank; keep it to change rank count)"),
    ("--teacher-sharding", "parallel.teacher", str,
     "under torchrun: shard | replicate the frozen stage teacher"),
    ("--sequence-parallel", "parallel.sequence", int,
     "under torchrun: split each video's tokens over N ranks (Ulysses attention; N divides "
     "the ranks and the model's heads; default 1)"),
]


def _add_actions(parser: argparse.ArgumentParser) -> None:
    """What to run: a stage (of a chain), the evaluation or everything; how to treat an
    existing stage; the TOML file and --compare rows."""
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--stage", type=_stage_id, metavar="N",
                        help="run stage N (0 = train/import the teacher, g = the guidance "
                             "stage, 1..3 = distil by halving)")
    action.add_argument("--eval", action="store_true", help="write the evaluation report")
    action.add_argument("--all", action="store_true",
                        help="run every stage (skipping complete ones), then --eval")
    add_chain_argument(parser, "which distillation chain --stage runs")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the stage from its newest checkpoint that verifies")
    again.add_argument("--restart", action="store_true",
                       help="train the stage again from scratch; its old folder is moved aside "
                            "to <stage>.old-<time>/ (nothing is deleted)")
    parser.add_argument("--config", metavar="TOML", help="a TOML configuration file")
    parser.add_argument("--compare", action="append", metavar="LABEL=RUN_DIR", default=None,
                        help="with --eval: add RUN_DIR's final GPD student as row LABEL (an "
                             "ablation trained on a copy of this run's stage0/); repeatable")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that set configuration keys (each overrides the TOML file and the defaults)."""
    for flag, key, kind, text in CONFIG_FLAGS:
        parser.add_argument(flag, dest=key, type=kind, default=None, help=text)
    parser.add_argument("--steps", type=int, nargs="+", metavar="N", default=None,
                        help="the teacher's steps, then each stage's student steps, each "
                             "dividing the one before (default 48 24 12 6; e.g. 48 24 12 6 3 "
                             "or 48 16 8 4)")
    parser.add_argument("--horizons", type=int, nargs="+", metavar="K", default=None,
                        dest="horizon.horizons",
                        help="horizon chain: teacher steps per student step, stage by stage "
                             "(default 2 3 4 5 6 7 8; the last divides the teacher's steps)")
    parser.add_argument("--iterations", type=int, nargs="+", metavar="N", default=None,
                        dest="distill.iterations",
                        help="GPD iterations per stage (1..3); with --stage N one value, that "
                             "stage's (the others keep theirs)")
    parser.add_argument("--freq-weight", type=float, nargs="+", metavar="W", default=None,
                        dest="distill.freq_weight",
                        help="frequency-loss weight per GPD stage (default 0 0 1)")
    parser.add_argument("--guidance-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        default=None, dest="guided.guidance_range",
                        help="guided chain: the CFG scales its guidance stage and students "
                             "learn (default 1 3)")
    parser.add_argument("--stage-guidance", type=float, nargs="+", metavar="W", default=None,
                        dest="distill.stage_guidance",
                        help="without a guidance stage: each GPD stage teacher's CFG scale "
                             "(default: --guidance for stage 1, then 1 = none)")
    parser.add_argument("--stage-guidance-2", type=float, nargs="+", metavar="W", default=None,
                        dest="distill.stage_guidance_2",
                        help="a Wan2.2 pair run: each GPD stage teacher's CFG scale for its "
                             "low-noise expert, as the sampler's --guidance-2 (default: "
                             "--stage-guidance's)")


def _add_video_and_device_flags(parser: argparse.ArgumentParser) -> None:
    """The videos --prompts are encoded for, and how the step runs on the device."""
    video = parser.add_argument_group("with --prompts: the videos to train for (WanPipeline's "
                                      "defaults) and the negative prompt")
    for name, default in VIDEO_DEFAULTS.items():  # None: not given (refused without --prompts)
        video.add_argument(f"--{name}", type=int, dest=f"video_{name}",
                           help=f"default {default}")
    video.add_argument("--negative", dest="video_negative",
                       help="negative prompt (default '' as WanPipeline; 'wan' = Wan's own)")
    parser.add_argument("--cuda-graph", action="store_true", default=None, dest="cuda_graph",
                        help="CUDA: capture each stage's training step once as a CUDA graph "
                             "and replay it (small presets are launch-bound); not with "
                             "torchrun, activation checkpointing or LoRA stages")
    parser.add_argument("--activation-checkpointing", action="store_true", default=None,
                        dest="parallel.activation_checkpointing",
                        help="recompute each transformer block in the backward (less memory)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpd_train", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Guided progressive distillation: 48-step CFG teacher -> 6-step student.")
    _add_actions(parser)
    _add_config_flags(parser)
    _add_video_and_device_flags(parser)
    return parser.parse_args(argv)


# Flags that only some stages read: given elsewhere they would be silently ignored.
DISTILL_FLAGS = {"distill.lr": "--lr", "distill.state_source": "--state-source",
                 "distill.iterations": "--iterations", "distill.freq_weight": "--freq-weight",
                 "distill.stage_guidance": "--stage-guidance",
                 "distill.stage_guidance_2": "--stage-guidance-2",
                 "distill.lora_rank": "--lora-rank", "distill.lora_alpha": "--lora-alpha"}
GUIDED_FLAGS = {"guided.guidance_range": "--guidance-range"}
HORIZON_FLAGS = {"horizon.horizons": "--horizons"}
CHAIN_TABLE_FLAGS = {**DISTILL_FLAGS, **GUIDED_FLAGS, **HORIZON_FLAGS}
STAGE0_FLAGS = {"stage0.iterations": "--teacher-iterations"}
# Flags only training reads (the evaluation samples finished stages).
TRAINING_FLAGS = {**DISTILL_FLAGS, **HORIZON_FLAGS, **STAGE0_FLAGS, "batch_size": "--batch-size",
                  "checkpoint_every": "--checkpoint-every", "log": "--log",
                  "validate_every": "--validate-every",
                  "parallel.data_streams": "--data-streams", "parallel.teacher":
                  "--teacher-sharding", "cuda_graph": "--cuda-graph",
                  "parallel.activation_checkpointing": "--activation-checkpointing",
                  "parallel.sequence": "--sequence-parallel"}
VIDEO_FLAGS = {"video_height": "--height", "video_width": "--width",
               "video_frames": "--frames", "video_negative": "--negative"}


def check_video_flags(args: argparse.Namespace, config: RunConfig) -> None:
    """--height/--width/--frames/--negative shape the encoding of --prompts, nothing else."""
    given = sorted(flag for key, flag in VIDEO_FLAGS.items() if getattr(args, key) is not None)
    if given and config.prompts is None:
        raise ConfigError(f"{', '.join(given)} set(s) the videos --prompts are encoded for; "
                         "without --prompts (a prompts file and --teacher) nothing reads them: "
                         "drop them (a --data set states its own latent shape)")


def video_options(args: argparse.Namespace) -> tuple[str, int, int, int]:
    """(negative prompt, height, width, frames) for encoding --prompts; defaults filled in."""
    size = [getattr(args, f"video_{name}") or default for name, default in VIDEO_DEFAULTS.items()]
    return (negative_text(args.video_negative or ""), *size)  # type: ignore[return-value]


def check_before_work(args: argparse.Namespace, config: RunConfig, run: TrainingRun | None) -> None:
    """The machine, the environment and the run folder's provenance allow this request;
    ``run`` (its model and data known) is None until --prompts are encoded."""
    if run is None:
        if args.stage is not None:
            check_stage(args.stage, config.stage_count(args.chain))
            stage_plan(config, StageId(args.chain, args.stage))  # a stage the chain has
        preflight.check_environment()
        preflight.check_threads(config.threads)
        check_log_backend(config.log)
        if not (args.stage == 0 and args.restart):  # that re-imports stage 0: the remedy
            preflight.check_teacher_matches(config)
        check_video_flags(args, config)
        check_prompts_teacher(config)
        preflight.check_expert_guidance(config)
        return
    preflight.check_precision(config.precision, run.device)
    if not args.eval:
        preflight.check_lora_width(config, run.dit_config)
        preflight.check_batch_fits(config, run.dit_config, run.data.latent_shape, run.device)


def check_flag_use(args: argparse.Namespace, given: set[str]) -> list[str]:
    """Refuse flags the requested action does not read; returns warnings for harmless ones."""
    if args.restart and args.stage is None:
        raise ConfigError("--restart applies to one stage: give --stage N (the embedded pipeline "
                         "retrains stale stages by itself)")
    if args.resume and args.stage is None:
        raise ConfigError("--resume applies to one stage: give --stage N (the embedded pipeline "
                         "and --all resume partial stages by themselves; --eval trains nothing)")
    if args.compare and not args.eval:
        raise ConfigError("--compare adds rows to the evaluation report: use it with --eval")
    _parse_compare(args.compare or [])  # a bad or repeated label refused before any work
    if args.eval:
        training = sorted(flag for key, flag in TRAINING_FLAGS.items() if key in given)
        if training:
            raise ConfigError(f"{', '.join(training)} set(s) training, which --eval does not do "
                             "(it samples the finished stages): drop them, or train with "
                             "--stage N first")
    if args.stage is None:
        return []
    distill = sorted(flag for key, flag in DISTILL_FLAGS.items() if key in given)
    if args.stage == 0 and distill:
        raise ConfigError(f"{', '.join(distill)} not used by stage 0 (the teacher): these set the "
                         "GPD distillation stages. Stage 0's options are --teacher-iterations "
                         "and the [stage0] table of a --config TOML file (e.g. lr = 3e-3)")
    section = CHAINS[args.chain].section
    elsewhere: dict[str, list[str]] = {}  # flags that set another chain's table, by table
    for key, flag in CHAIN_TABLE_FLAGS.items():
        table = key.partition(".")[0]
        if key in given and table != section:
            elsewhere.setdefault(table, []).append(flag)
    for table, flags in sorted(elsewhere.items()):
        readers = [c.name for c in CHAINS.values() if c.section == table]
        raise ConfigError(f"{', '.join(sorted(flags))} set the [{table}] table (read by --chain "
                         f"{' or '.join(readers)}); the {args.chain} chain reads the [{section}] "
                         "table of a --config TOML file")
    return [f"{flag} is ignored by stage {args.stage} (it sets stage 0's training)"
            for key, flag in STAGE0_FLAGS.items() if key in given and args.stage != 0]


def check_stage(stage: int | str, num_stages: int) -> None:
    if stage != GUIDANCE_STAGE and not 0 <= int(stage) <= num_stages:
        raise ConfigError(f"--stage must be {GUIDANCE_STAGE} or in 0..{num_stages}, got {stage}")


def with_iterations(args: argparse.Namespace, settings: dict[str, Any],
                    values: list[int] | None) -> dict[str, Any]:
    """``settings`` (TOML and the other flags, merged) with ``--iterations``: one value per
    GPD stage, or with ``--stage N`` one value, stage N's (``--stage g``: the guidance
    stage's), the other stages keeping theirs from the --config file or the defaults."""
    if values is None:
        return settings
    fitted = fit_stage_lists(settings)
    distill = fitted.get("distill", {})
    if args.stage == GUIDANCE_STAGE and len(values) == 1:
        return {**fitted, "distill": {**distill, "guidance_iterations": values[0]}}
    steps = fitted.get("steps", list(DEFAULT_STEPS))
    if (not isinstance(steps, list) or not isinstance(distill.get("iterations"), list)
            or len(values) == len(steps) - 1):  # the rules judge what is not a list
        return {**fitted, "distill": {**distill, "iterations": values}}
    if args.stage is not None:
        check_stage(args.stage, len(steps) - 1)
    if args.stage is None or len(values) != 1:
        raise ConfigError(f"--iterations takes one value per stage ({len(steps) - 1}), or with "
                         f"--stage N the value for stage N; got {len(values)} ({values})")
    stages = list(distill["iterations"])  # the TOML file's, or the defaults fitted to steps
    stages[int(args.stage) - 1] = values[0]
    return {**fitted, "distill": {**distill, "iterations": stages}}


def check_evaluable(config: RunConfig) -> None:
    """--eval evaluates a trained run: at least its stage 0 must be there."""
    teacher = StageId(DEFAULT_CHAIN, 0)
    folder = teacher.folder(config.run_dir)
    if not (folder / RECORD).is_file() or not (folder / OUTPUT).is_file():
        where = "" if config.run_dir == RunConfig.run_dir else f" --run-dir {config.run_dir}"
        raise ConfigError(f"--eval: {config.run_dir} holds no trained run (no complete "
                          f"{folder}); train it first with `python -m gpd_train{where}` (every "
                          "stage, then the evaluation)")
    for chain in config.pipeline_chains:  # a stage past this configuration's: trained with others
        beyond = StageId(chain, config.stage_count(chain) + 1)
        if (beyond.folder(config.run_dir) / RECORD).is_file():
            raise ConfigError(f"--eval: {beyond.folder(config.run_dir)} is a finished stage "
                              f"beyond the {config.stage_count(chain)} {chain} stages of steps "
                              f"{config.steps}, so the report would leave it out: give the "
                              "--steps (or --config) it was trained with")


def configure(args: argparse.Namespace) -> RunConfig:
    """The run's configuration: flags the action does not read refused (harmless ones warned
    about), then the one resolve step: defaults <- TOML <- flags (and a Diffusers teacher
    folder's defaults) merged first, then every rule once."""
    skip = {"stage", "eval", "all", "chain", "resume", "restart", "config", "compare",
            *VIDEO_FLAGS}
    overrides = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    for warning in check_flag_use(args, set(overrides)):
        print(f"warning: {warning}", file=sys.stderr)
    iterations = overrides.pop("distill.iterations", None)
    settings = with_teacher_defaults(read_settings(args.config, overrides))
    return resolve(with_iterations(args, settings, iterations))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    held = contextlib.ExitStack()
    config: RunConfig | None = None
    try:
        config = configure(args)
        check_destination("--run-dir", config.run_dir, RUN)  # never someone else's folder
        check_run_paths(config)  # before anything is written or started
        if args.eval:
            check_evaluable(config)  # before the lock would create the folder
        check_before_work(args, config, None)
        note = threads.set_threads(config.threads)
        if note is not None:
            print(note, file=sys.stderr)
        parallel.setup(config.device)  # joins torchrun's process group; no-op otherwise
        # Without --prompts the run's model and data are known now: checked before the lock
        # creates the run folder. --prompts are encoded into it first, under the lock.
        run = None if config.prompts is not None else TrainingRun(config)
        if run is not None:
            check_before_work(args, config, run)
        if parallel.is_main():  # one trainer per run folder; ranks of one job share it
            held.enter_context(RunLock(config.run_dir))
        if run is None:  # one rank encodes; every rank then reads the shards
            encoded = parallel.main_only(encode_for_run, config, *video_options(args))
            config = dataclasses.replace(config, data=encoded)  # the data set it made
            run = TrainingRun(config)
            check_before_work(args, config, run)
        if args.stage is not None:
            output = run_stage(run, StageId(args.chain, args.stage), resume=args.resume,
                               restart=args.restart)
            print(f"stage {args.stage} output: {output}")
            return 0
        if args.eval:
            compare = _parse_compare(args.compare or [])
            if parallel.is_main():  # rank 0 evaluates
                run = trainable_plan(run)[1]
                report = evaluate_run(run, run.data, compare)
            else:
                report = None
        else:
            report = run_pipeline(config, resume=True)
    except COMMAND_ERRORS as exc:  # an OSError: said about the run folder or the file it names
        return command_failed(exc, None if config is None else config.run_dir)
    finally:
        held.close()
        parallel.teardown()
    print(f"report: {report}  ({time.perf_counter() - started:.0f} s)")
    print(report.read_text() if report is not None else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
