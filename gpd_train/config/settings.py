"""Run configuration: defaults for the embedded demo, a TOML file, and command-line flags.

Precedence: flags > TOML file > defaults, merged before any rule runs; then every rule runs
once on the merged values and the result is frozen (gpd_train/config/load.py:
``load_config`` is ``read_settings``, then ``resolve``). Per-stage lists a user leaves unset
follow the chain's schedule (``steps``, or a horizon chain's ``horizons``). TOML layout
(every key optional)::

    run_dir = "runs/default"
    preset = "tiny"            # gpd_model preset
    task = "t2v"               # t2v | i2v (tiny-i2v's; a TI2V model, tiny-ti2v's too, does both)
    device = "auto"            # auto | cpu | cuda | cuda:N
    threads = 0                # CPU threads for torch; 0: its default, fewer on busy cores
    precision = "fp32"         # fp32 | bf16 (bf16 autocast; CUDA only)
    cuda_graph = false         # CUDA: each training step one captured graph (train/step.py)
    seed = 0
    data = "path/to/prompt-embeddings"   # omit for the built-in procedural videos
    teacher = "path/to/wan2.1"           # stage 0 imports instead of training
    prompts = "prompts.txt"    # with a Diffusers teacher: encoded into <run_dir>/prompt-embeddings
    shift = 3.0                # sigma-grid shift (Wan 480p T2V: 5.0)
    guidance = 1.5             # the base teacher's CFG scale (tiny default 1.5, else 5.0)
    steps = [48, 24, 12, 6]    # teacher steps, then each stage's student steps (each divides
                               # the one before: [48, 24, 12, 6, 3], [48, 16, 8, 4], ...)
    batch_size = 16
    checkpoint_every = 50
    log = "none"               # none | tensorboard: scalars (and validation) per stage folder
    validate_every = 0         # > 0: sample the EMA student's validation set every N iterations
    pipeline_chains = [...]    # the chains the pipeline trains, in order (gpd_train.config.chains)

    [stage0]                   # flow-matching training of the base teacher
    iterations = 10000
    lr = 3e-3
    final_lr_ratio = 0.1       # cosine decay to this fraction of lr (1.0 = constant)
    cfg_dropout = 0.1
    ema_decay = 0.995

    [distill]                  # GPD stages 1..3 (one list entry per stage)
    iterations = [2000, 1000, 2000]  # stage 1 absorbs CFG, stage 3 makes the largest steps
    lr = 3e-4
    state_source = "teacher"   # student | teacher | data
    lane_groups = 4            # rollout lanes = batch_size x lane_groups; one group per update
    freq_weight = [0.0, 0.0, 1.0]
    freq_form = "fourier_mse"  # fourier_mse (the paper's, alpha/gamma below) | band_amplitude
    freq_alpha_s = 4.0
    freq_alpha_t = 1.0
    freq_gamma = 2.0
    final_lr_ratio = 0.1
    ema_decay = 0.998
    guidance_stage = false     # true: a w-conditioned guidance stage before halving
    guidance_range = [1.0, 3.0]  # w drawn per trajectory (guidance stage and after)
    guidance_iterations = 2000
    stage_guidance = [1.5, 1.0, 1.0]  # without a guidance stage: CFG of each stage teacher
    lora_rank = 0              # > 0: rank-R LoRA adapters on a frozen stage-0 base (lora.py)
    lora_alpha = 16.0          # the update is alpha / rank * B A; omit for alpha = rank
    lora_targets = ["self_attn.qkv", "ffn.0"]  # omit for every attention and FFN projection

    [horizon]                  # the GPD paper's recipe (gpd_train/train/horizon.py)
    horizons = [2, 3, 4, 5, 6, 7, 8]  # teacher steps per student step, stage by stage
    iterations = [700, 700, 700, 700, 700, 700, 700]
    freq_weight = [0, 0, 0, 0, 0, 0, 1.0]
    guidance_anneal = [1.5, 1.05]  # T0's CFG per stage, linear from/to (default: guidance
                                   # to 1 + (guidance - 1) / 10, the paper's 6.0 -> 1.5)

    [guided]                   # the guided chain: keys as [distill]; guidance_stage = true
    guidance_range = [1.0, 3.0]  # iterations and freq_weight default to [distill]'s

    [vanilla]                  # the ablation chain: data states, MSE only
    iterations = [2000, 1000, 2000]

    [eval]
    prompts = 192              # 16 noise seeds per built-in prompt
    batch_size = 48
    guidance_values = [1.0, 3.0]  # other w of the w-conditioned student (default: the range ends)

    [parallel]                 # used under torchrun (gpd_train/parallel.py)
    data_streams = 0           # 0 = one per rank; fix it to resume on another rank count
    activation_checkpointing = false
    teacher = "shard"          # shard | replicate (the frozen stage teacher)
    sequence = 1               # ranks that split each video's tokens (Ulysses); divides the ranks

``batch_size`` is per process: the global batch is batch_size x the number of ranks (with
``parallel.sequence`` = S, x the number of ranks / S: S ranks share each sample).

Input paths (``data``, ``teacher``, ``prompts``) given as flags or in a TOML file are taken
relative to the current directory and held absolute. A run folder's ``config.json`` stores
those inside the run folder relative to it and the others absolute, so the folder can be
moved and read from any directory (gpd_train/config/load.py ``load_run_config``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gpd_model import PRESETS, CheckpointError, DiTConfig
from gpd_train.config.chains import CHAINS, DEFAULT_CHAIN, DEFAULT_PIPELINE, chain_names, get_chain
from gpd_train.config.checks import check_device, check_number, check_numbers, is_int
from gpd_train.errors import ConfigError, LoraError

STATE_SOURCES = ("student", "teacher", "data")
# The frequency loss's forms: the paper's frequency-weighted MSE (gpd_kernels.freq_loss) and
# band-amplitude matching of the clean-sample predictions (aimed at blur; objectives.py).
FREQ_FORMS = ("fourier_mse", "band_amplitude")
# The projections LoRA adapters may target (gpd_train.run.lora), and how a frozen stage teacher
# is held under torchrun (gpd_train.parallel).
LORA_TARGETS = ("self_attn.qkv", "self_attn.o", "cross_attn.q", "cross_attn.kv",
                "cross_attn.o", "ffn.0", "ffn.2")
TEACHER_MODES = ("shard", "replicate")


@dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha (the update is ``alpha / rank * B A``) and the adapted projections."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoRA rank must be an int >= 1, got {self.rank!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not 0 < self.alpha < float("inf")):
            raise LoraError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            raise LoraError(f"LoRA targets must be distinct names of {LORA_TARGETS}, got "
                            f"{list(self.targets)!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_metadata(self) -> str:
        return json.dumps({**asdict(self), "targets": list(self.targets)}, sort_keys=True)

    @classmethod
    def from_metadata(cls, text: str, source: Path | str) -> LoraSpec:
        try:
            raw = json.loads(text)
            return cls(int(raw["rank"]), float(raw["alpha"]), tuple(raw["targets"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{source}: unreadable LoRA spec {text!r} ({exc})") from None


@dataclass(frozen=True)
class ParallelConfig:
    """The ``[parallel]`` TOML section (also flags of ``python -m gpd_train``)."""

    data_streams: int = 0  # 0: one per rank. Fix it to resume on another number of ranks.
    activation_checkpointing: bool = False  # recompute each block in the backward
    teacher: str = "shard"  # the frozen stage teacher under torchrun: shard | replicate
    sequence: int = 1  # ranks splitting each video's tokens (Ulysses sequence parallelism)

    def validate(self) -> None:
        if (not isinstance(self.sequence, int) or isinstance(self.sequence, bool)
                or self.sequence < 1):
            raise ConfigError(f"parallel.sequence (--sequence-parallel) must be an int >= 1, "
                              f"got {self.sequence!r}")
        if not isinstance(self.data_streams, int) or self.data_streams < 0:
            raise ConfigError(f"parallel.data_streams must be an int >= 0, got "
                             f"{self.data_streams!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ConfigError("parallel.activation_checkpointing must be true or false, got "
                             f"{self.activation_checkpointing!r}")
        if self.teacher not in TEACHER_MODES:
            raise ConfigError(f"parallel.teacher must be one of {TEACHER_MODES}, got "
                             f"{self.teacher!r}")

TASKS = ("t2v", "i2v")  # text-to-video; image-to-video (built-in data: from the first frame)
LOG_BACKENDS = ("none", "tensorboard")  # --log: where training's scalars also go

# Per-preset defaults for values the DiT config does not carry.
PRESET_SHIFT = {"tiny": 3.0, "tiny-wide": 3.0, "tiny-i2v": 3.0, "tiny-ti2v": 3.0}
DEFAULT_SHIFT = 5.0  # Wan2.1 T2V at 480p
# The tiny teacher follows prompts as well unguided as at scale 4 (prompt accuracy 0.77 vs
# 0.71 over 48 videos), while the guidance-free stage-1 student's loss grows ~(w - 1)^2.
PRESET_GUIDANCE = {"tiny": 1.5, "tiny-wide": 1.5, "tiny-i2v": 1.5, "tiny-ti2v": 1.5}
DEFAULT_GUIDANCE = 5.0  # Wan2.1 T2V
# A horizon chain's CFG anneal ends at this share of the guidance beyond 1 (the GPD paper's
# 6.0 -> 1.5 for Wan2.1: 5.0 -> 0.5).
HORIZON_ANNEAL = 0.1
DEFAULT_STEPS = (48, 24, 12, 6)  # the teacher's, then each GPD stage's student's
PATH_KEYS = ("data", "teacher", "prompts")  # input paths, held absolute once loaded
RUN_CONFIG = "config.json"  # a run folder's configuration
# Seeds feed torch.Generator.manual_seed (64 bits) as seed * 1000 + a stage offset.
SEED_MAX = 2**32 - 1
# The per-stage lists of a chain's table and the trainer flag that sets them (GPD chain).
PER_STAGE = {"iterations": "--iterations", "freq_weight": "--freq-weight"}


def check_task(task: str, cfg: DiTConfig, model: str = "the model") -> None:
    """``task`` must be one ``cfg`` is made for: an image-to-video input is wider; a
    Wan2.2-TI2V model (``expand_timesteps``, input as wide as its output) does both, its
    image condition replacing the first latent frame (gpd_model.DiTDenoiser)."""
    made_for = "i2v" if cfg.image_to_video else "t2v"
    if cfg.expand_timesteps and not cfg.image_to_video and task in TASKS:
        return
    if task != made_for:
        raise ConfigError(f"task {task!r} does not fit {model}: it is {made_for} (in_channels "
                         f"{cfg.in_channels}, out_channels {cfg.out_channels}); give task "
                         f"{made_for!r} or a preset for {task}")


@dataclass(frozen=True)
class Stage0Config:
    iterations: int = 10000
    lr: float = 3e-3
    warmup: int = 100
    final_lr_ratio: float = 0.1
    cfg_dropout: float = 0.1
    ema_decay: float = 0.995


@dataclass(frozen=True)
class DistillConfig:
    iterations: list[int] = field(default_factory=lambda: [2000, 1000, 2000])
    lr: float = 3e-4
    warmup: int = 10
    final_lr_ratio: float = 0.1
    state_source: str = "teacher"
    lane_groups: int = 4
    freq_weight: list[float] = field(default_factory=lambda: [0.0, 0.0, 1.0])
    freq_form: str = "fourier_mse"
    freq_alpha_s: float = 4.0
    freq_alpha_t: float = 1.0
    freq_gamma: float = 2.0
    ema_decay: float = 0.998
    # The guidance stage (before halving): the student takes w as an input and learns the
    # teacher's guided velocity for w in guidance_range; the halving stages keep the input.
    guidance_stage: bool = False
    guidance_range: list[float] = field(default_factory=lambda: [1.0, 3.0])
    guidance_iterations: int = 2000
    # Without a guidance stage: the stage teachers' CFG scales, one per stage (1 = no CFG;
    # a stage teacher after T0 is a student, guided with its own unconditional branch).
    # Default: the run's guidance for stage 1 (T0), none after.
    stage_guidance: list[float] | None = None
    # A Wan2.2 pair run only: the low-noise expert's stage-teacher CFG scale, one per stage
    # (the pipeline's guidance_scale_2, the sampler's --guidance-2); stage_guidance guides
    # the high-noise one. Default: stage_guidance's.
    stage_guidance_2: list[float] | None = None
    # Linear from/to over the stages, where stage_guidance is not given (the horizon chain).
    guidance_anneal: list[float] | None = None
    # A horizon chain (gpd_train/train/horizon.py): stage k's student jumps horizons[k-1] teacher
    # steps; None for chains whose stages follow the run's steps.
    horizons: list[int] | None = None
    # LoRA distillation (gpd_train.run.lora): 0 trains full weights. R > 0 trains rank-R adapters
    # on the frozen stage-0 base in every distillation stage; the stage teacher is the base
    # plus the previous stage's adapter, and stage outputs hold the adapter alone.
    lora_rank: int = 0
    lora_alpha: float | None = None  # None: = lora_rank (scale 1)
    lora_targets: list[str] | None = None  # None: gpd_train.run.lora.LORA_TARGETS

    def lora_spec(self) -> LoraSpec | None:
        """The chain's LoRA spec, or None for full-weight stages."""
        if not self.lora_rank:
            return None
        alpha = float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)
        targets = LORA_TARGETS if self.lora_targets is None else tuple(self.lora_targets)
        return LoraSpec(self.lora_rank, alpha, targets)


def default_chain_tables() -> dict[str, DistillConfig]:
    """One table per registered chain's TOML section, with the chain's own defaults."""
    tables: dict[str, DistillConfig] = {}
    for chain in CHAINS.values():
        tables.setdefault(chain.section, DistillConfig(**chain.defaults))
    return tables


@dataclass(frozen=True)
class EvalConfig:
    prompts: int = 192
    batch_size: int = 48
    seed: int = 1234
    examples: int = 4
    # Other CFG scales the w-conditioned student is evaluated at (after a guidance stage);
    # None: the ends of distill.guidance_range.
    guidance_values: list[float] | None = None


@dataclass(frozen=True)
class RunConfig:
    """A run's configuration, resolved once and frozen: the fields as given (what
    config.json stores), and the values derived from them as fields set by ``_resolve``
    (``init=False``), so every reader reads a field and nothing is recomputed."""

    run_dir: str = "runs/default"
    preset: str = "tiny"
    task: str = "t2v"
    device: str = "auto"
    threads: int = 0
    precision: str = "fp32"
    cuda_graph: bool = False
    seed: int = 0
    data: str | None = None
    teacher: str | None = None
    prompts: str | None = None
    shift: float | None = None
    guidance: float | None = None
    steps: list[int] = field(default_factory=lambda: list(DEFAULT_STEPS))
    batch_size: int = 16
    checkpoint_every: int = 50
    # Watching training (gpd_train.train.monitor); neither changes what a stage trains.
    log: str = "none"
    validate_every: int = 0
    stage0: Stage0Config = field(default_factory=Stage0Config)
    # The chains' TOML tables ([distill], [guided], [vanilla], ...: gpd_train.config.chains),
    # by section name, as given; config.json and TOML files hold them as top-level tables.
    chain_tables: dict[str, DistillConfig] = field(default_factory=default_chain_tables)
    # The chains the embedded pipeline trains and the evaluation reports, in order. The
    # guided chain is opt-in: at w = 1.5 its 6-step student is ~1 dB further from the
    # teacher than the GPD chain's (README's ablations), and it adds ~6 minutes to the demo.
    pipeline_chains: list[str] = field(default_factory=lambda: list(DEFAULT_PIPELINE))
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Resolved by _resolve: shift and CFG scale (the preset's where not given), and each
    # registered chain's table with the lists it leaves unset (None) taken from the default
    # chain's and, without a guidance stage, its stage teachers' CFG scales filled in.
    resolved_shift: float = field(init=False)
    resolved_guidance: float = field(init=False)
    chains: Mapping[str, DistillConfig] = field(init=False)

    def __post_init__(self) -> None:
        self._resolve()

    def _resolve(self) -> None:
        """Every rule, once, then the derived fields (the one place they are computed)."""
        self.validate()
        shift = self.shift if self.shift is not None else PRESET_SHIFT.get(self.preset,
                                                                           DEFAULT_SHIFT)
        guidance = (self.guidance if self.guidance is not None
                    else PRESET_GUIDANCE.get(self.preset, DEFAULT_GUIDANCE))
        object.__setattr__(self, "resolved_shift", float(shift))
        object.__setattr__(self, "resolved_guidance", float(guidance))
        object.__setattr__(self, "chains", MappingProxyType({
            name: self._with_stage_guidance(name, table)
            for name, table in self._inherited_tables().items()}))

    def _inherited_tables(self) -> dict[str, DistillConfig]:
        """Each chain's table, lists it leaves unset taken from the default chain's, so a
        run's stage budget is set in one place."""
        default = self.table(get_chain(DEFAULT_CHAIN).section)
        tables = {}
        for name, declared in CHAINS.items():
            table = self.table(declared.section)
            inherited = {key: list(getattr(default, key)) for key in PER_STAGE
                         if getattr(table, key) is None}
            tables[name] = dataclasses.replace(table, **inherited)
        return tables

    def _with_stage_guidance(self, name: str, table: DistillConfig) -> DistillConfig:
        """``table`` with its stage teachers' CFG scales filled in: each high expert's (or
        the one model's) and each low expert's, the high one's where not given."""
        high = self._stage_guidance(name, table)
        low = table.stage_guidance_2
        return dataclasses.replace(table, stage_guidance=high, stage_guidance_2=(
            high if low is None else [float(w) for w in low]))

    def _stage_guidance(self, name: str, table: DistillConfig) -> list[float] | None:
        """Each stage teacher's CFG scale in a chain without a guidance stage (None with one)."""
        if table.guidance_stage:
            return None
        if table.stage_guidance is not None:
            return [float(w) for w in table.stage_guidance]
        stages, w = self.stage_count(name), float(self.resolved_guidance)
        anneal = table.guidance_anneal
        if anneal is None and table.horizons is not None:
            anneal = [w, 1 + (w - 1) * HORIZON_ANNEAL]
        if anneal is not None:
            start, end = map(float, anneal)
            return [start + (end - start) * k / max(stages - 1, 1) for k in range(stages)]
        return [w] + [1.0] * (stages - 1)

    def stage_count(self, chain: str) -> int:
        """The distillation stages of ``chain`` (not counting a guidance stage)."""
        declared = get_chain(chain)
        return declared.schedule.stage_count(self.steps, self.table(declared.section))

    def table(self, section: str) -> DistillConfig:
        """The chain table [section] as given (e.g. ``table("distill")``)."""
        try:
            return self.chain_tables[section]
        except KeyError:
            raise ConfigError(f"no chain table [{section}]; the registered chains read "
                             f"{sorted(self.chain_tables)}") from None

    def chain(self, name: str) -> DistillConfig:
        """The chain's resolved table (``chains[name]``, named in errors)."""
        get_chain(name)
        return self.chains[name]

    def validate(self) -> None:
        """The rules, in an order that names the first cause: the schedules before the
        per-stage lists they size, the lists before the numbers in them."""
        steps = self.steps
        if (not isinstance(steps, list) or len(steps) < 2
                or any(not is_int(k) or k < 1 for k in steps)):
            raise ConfigError(f"steps must list >= 2 positive ints, got {steps!r}")
        for k, (teacher_steps, student_steps) in enumerate(zip(steps, steps[1:], strict=False)):
            if student_steps >= teacher_steps or teacher_steps % student_steps:
                divisors = [d for d in range(teacher_steps - 1, 0, -1) if teacher_steps % d == 0]
                raise ConfigError(f"steps: each stage's student steps must divide its teacher's "
                                 f"and be fewer; stage {k + 1} has {teacher_steps} -> "
                                 f"{student_steps} (steps {steps}); after {teacher_steps} choose "
                                 f"one of {divisors}")
        for name, declared in CHAINS.items():
            declared.schedule.check(declared.section, name, self.table(declared.section))
        self._check_stage_lists(lengths=False)  # lists first: the resolved tables copy them
        tables = self._inherited_tables()
        self._check_numbers(tables)
        self._check_stage_lists(lengths=True)
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.teacher is None and self.preset in PRESETS:  # a teacher folder: checked on load
            check_task(self.task, PRESETS[self.preset], f"preset {self.preset!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ConfigError(f"cuda_graph must be true or false, got {self.cuda_graph!r}")
        if self.log not in LOG_BACKENDS:
            raise ConfigError(f"log must be one of {', '.join(LOG_BACKENDS)}, got {self.log!r}")
        self.parallel.validate()
        if self.prompts is not None and self.teacher is None:
            raise ConfigError(f"prompts ({self.prompts!r}) are encoded by the teacher's "
                             "Wan2.1-T2V-Diffusers folder: give teacher too")
        if self.shift is not None:
            check_number("shift", self.shift, low=0, low_open=True)
        if self.guidance is not None:
            check_number("guidance", self.guidance, low=0, low_open=True,
                         note=" (1 = no guidance)")
        values = self.eval.guidance_values
        if values is not None and (not isinstance(values, (list, tuple))
                                   or not all(_finite_scale(w) for w in values)):
            raise ConfigError(f"eval.guidance_values must be a list of CFG scales > 0, got "
                             f"{values!r}")
        chains = self.pipeline_chains
        if (not isinstance(chains, list) or not chains or not set(chains) <= set(CHAINS)
                or len(set(chains)) != len(chains)):
            raise ConfigError(f"pipeline_chains must list distinct chains of {chain_names()}, "
                             f"got {chains!r}")
        for name, declared in CHAINS.items():
            chain = tables[name]
            if chain.guidance_stage and not declared.allows_guidance_stage:
                raise ConfigError(f"{declared.section}.guidance_stage must be false: the {name} "
                                 f"chain is {declared.summary}")
            if chain.state_source not in STATE_SOURCES:
                raise ConfigError(f"{name}.state_source must be one of {STATE_SOURCES}, got "
                                 f"{chain.state_source!r}")
            if chain.freq_form not in FREQ_FORMS:
                raise ConfigError(f"{declared.section}.freq_form must be one of {FREQ_FORMS}, "
                                 f"got {chain.freq_form!r}")
            if (not isinstance(chain.lane_groups, int) or isinstance(chain.lane_groups, bool)
                    or chain.lane_groups < 1):
                section = declared.section
                raise ConfigError(f"{section}.lane_groups must be a positive int, got "
                                 f"{chain.lane_groups!r}")
            _check_guidance_options(name, chain, self.stage_count(name))
            _check_lora_options(name, chain)
        for name in chains:  # a chain run by --chain alone is checked when its stage starts
            declared = get_chain(name)
            declared.schedule.check_fits(declared.section, tables[name], self.steps)

    def _check_stage_lists(self, lengths: bool) -> None:
        """The per-stage lists are lists (with ``lengths``: one entry per stage of the chain's
        schedule; ``load_config`` sizes the lists a user leaves unset)."""
        default_section = get_chain(DEFAULT_CHAIN).section
        for name, declared in CHAINS.items():
            section = declared.section
            table = self.table(section)
            defaults = default_chain_tables()[section]
            stages = self.stage_count(name)
            schedule = declared.schedule.describe(section, self.steps, table)
            for key, flag in PER_STAGE.items():
                values = getattr(table, key)
                if values is None and section != default_section:
                    continue  # inherits the default chain's, checked as those
                example = (getattr(defaults, key) or getattr(DistillConfig(), key))[:1] * stages
                if not isinstance(values, list):
                    raise ConfigError(f"{section}.{key} must be a list, got {values!r}: one entry "
                                     f"per stage ({stages} for {schedule}), e.g. {key} = "
                                     f"{example}")
                if lengths and len(values) != stages:
                    where = (f"{flag} or " if section == default_section else "") + (
                        f"[{section}] {key} in the TOML file")
                    raise ConfigError(
                        f"{section}.{key} needs one entry per stage: {schedule} makes "
                        f"{stages} stage(s), {section}.{key} has {len(values)} ({values!r}); "
                        f"give {stages} value(s) ({where}), or leave it unset to follow "
                        f"{schedule}")

    def _check_numbers(self, tables: dict[str, DistillConfig]) -> None:
        """Every number finite, in range, and an int where an int is meant (TOML and flags
        alike: a string or 1.5 where a count belongs is refused here, not deep in training)."""
        check_number("seed", self.seed, integer=True, low=0, high=SEED_MAX)
        for key in ("batch_size", "checkpoint_every"):
            check_number(key, getattr(self, key), integer=True, low=1)
        check_number("threads", self.threads, integer=True, low=0)
        check_number("validate_every", self.validate_every, integer=True, low=0)
        check_number("stage0.iterations", self.stage0.iterations, integer=True, low=1)
        chains = [(c.section, tables[name]) for name, c in CHAINS.items()]
        for section, values in (("stage0", self.stage0), *chains):
            check_number(f"{section}.lr", values.lr, low=0, low_open=True)
            check_number(f"{section}.warmup", values.warmup, integer=True, low=0)
            check_number(f"{section}.final_lr_ratio", values.final_lr_ratio, low=0, high=1,
                         low_open=True)
            check_number(f"{section}.ema_decay", values.ema_decay, low=0, high=1,
                         high_open=True)
        check_number("stage0.cfg_dropout", self.stage0.cfg_dropout, low=0, high=1,
                     high_open=True)
        for section, values in chains:
            if not isinstance(values.guidance_stage, bool):
                raise ConfigError(f"{section}.guidance_stage must be true or false, got "
                                 f"{values.guidance_stage!r}")
            check_numbers(f"{section}.iterations", values.iterations, integer=True, low=1)
            check_numbers(f"{section}.freq_weight", values.freq_weight, low=0)
            for key in ("freq_alpha_s", "freq_alpha_t", "freq_gamma"):
                check_number(f"{section}.{key}", getattr(values, key), low=0)
        for key in ("prompts", "batch_size", "examples"):
            check_number(f"eval.{key}", getattr(self.eval, key), integer=True, low=1)
        check_number("eval.seed", self.eval.seed, integer=True, low=0, high=SEED_MAX)
        for key in ("run_dir", "preset", "task", "device", "precision"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a string, got {getattr(self, key)!r}")
        for key in ("data", "teacher", "prompts"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a path (a string), got {getattr(self, key)!r}")
        check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """The fields as given (not the resolved ones), chain tables at the top level."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        tables = {section: asdict(table) for section, table in flat.pop("chain_tables").items()}
        return {**tables, **{key: (asdict(value) if dataclasses.is_dataclass(value)
                                   else copy.deepcopy(value)) for key, value in flat.items()}}

    def to_json(self) -> str:
        """config.json's text: input paths inside the run folder relative to it (the folder
        can be moved), the others absolute (it can be read from any directory)."""
        values = self.to_dict()
        folder = Path(os.path.abspath(self.run_dir))
        for key in PATH_KEYS:
            if values[key] is not None:
                path = Path(os.path.abspath(values[key]))
                values[key] = str(path.relative_to(folder) if path.is_relative_to(folder)
                                  else path)
        return json.dumps(values, indent=2, sort_keys=True)


def _finite_scale(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _check_guidance_options(name: str, chain: DistillConfig, stages: int) -> None:
    section = get_chain(name).section
    low_high = chain.guidance_range
    if (not isinstance(low_high, (list, tuple)) or len(low_high) != 2
            or not all(_finite_scale(w) for w in low_high) or low_high[0] > low_high[1]):
        raise ConfigError(f"{section}.guidance_range must be [low, high] with 0 < low <= high, "
                         f"got {low_high!r}")
    iterations = chain.guidance_iterations
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ConfigError(f"{section}.guidance_iterations must be a positive int, got "
                         f"{iterations!r}")
    anneal = chain.guidance_anneal
    if anneal is not None and (not isinstance(anneal, (list, tuple)) or len(anneal) != 2
                               or not all(_finite_scale(w) for w in anneal)):
        raise ConfigError(f"{section}.guidance_anneal must be [from, to] CFG scales > 0, got "
                         f"{anneal!r}")
    if anneal is not None and chain.guidance_stage:
        raise ConfigError(f"{section}.guidance_anneal and {section}.guidance_stage exclude each "
                         "other: after a guidance stage the students take w as an input")
    low = chain.stage_guidance_2
    if low is not None and chain.guidance_stage:
        raise ConfigError(f"{section}.stage_guidance_2 (the low expert's stage-teacher CFG "
                         f"scales) and {section}.guidance_stage exclude each other: after a "
                         "guidance stage the students take w as an input; set one of them")
    if low is not None and (not isinstance(low, (list, tuple)) or len(low) != stages
                            or not all(_finite_scale(w) for w in low)):
        raise ConfigError(f"{section}.stage_guidance_2 needs one CFG scale > 0 per stage "
                         f"({stages}), got {low!r}")
    scales = chain.stage_guidance
    if scales is None:
        return
    if anneal is not None:
        raise ConfigError(f"{section}.stage_guidance and {section}.guidance_anneal both set the "
                         "stage teachers' CFG scales (one per stage, or linear from/to): set "
                         "one of them")
    if chain.guidance_stage:
        raise ConfigError(f"{section}.stage_guidance (CFG per stage) and {section}.guidance_stage "
                         "exclude each other: after a guidance stage the students take w as an "
                         "input; set one of them")
    if (not isinstance(scales, (list, tuple)) or len(scales) != stages
            or not all(_finite_scale(w) for w in scales)):
        raise ConfigError(f"{section}.stage_guidance needs one CFG scale > 0 per stage ({stages}), "
                         f"got {scales!r}")


def _check_lora_options(name: str, chain: DistillConfig) -> None:
    section = get_chain(name).section
    check_number(f"{section}.lora_rank", chain.lora_rank, integer=True, low=0)
    if chain.lora_alpha is not None:
        check_number(f"{section}.lora_alpha", chain.lora_alpha, low=0, low_open=True)
    unread = [key for key in ("lora_alpha", "lora_targets") if getattr(chain, key) is not None]
    if unread and not chain.lora_rank:
        raise ConfigError(f"{', '.join(f'{section}.{key}' for key in unread)} only apply to "
                         f"LoRA adapters, but {section}.lora_rank is 0 (full weights): give a rank "
                         "(--lora-rank R) or drop them")
    targets = chain.lora_targets
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not set(targets) <= set(LORA_TARGETS)
                                or len(set(targets)) != len(targets)):
        raise ConfigError(f"{section}.lora_targets must list distinct projections of "
                         f"{list(LORA_TARGETS)}, got {targets!r}")
