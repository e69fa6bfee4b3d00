"""The distillation chains, each declared once, and the stages of a run folder as values.

A chain is a sequence of distillation stages that starts from the shared base teacher
(stage 0): optionally a guidance stage (w becomes a model input), then one stage per entry
of the run's ``steps[1:]`` (each dividing the one before: stage k learns r = steps[k-1] /
steps[k] teacher steps per student step: ``HALVING``), or another ``Schedule``, such as the
horizon chain's one stage per entry of its table's ``horizons`` (gpd_train/train/horizon.py
registers that chain and its schedule; gpd_train/config/plan.py reads the schedules).
Everything that differs between chains is in its ``Chain`` declaration: the TOML table
it reads, its label in reports, where its stages live, its seed offset, how the evaluation
treats it and (optionally) its own objective and schedule. The trainer, the CLIs, the
evaluation and the export all read ``CHAINS``; adding a chain is a ``register(Chain(...))``
call plus, if it learns something new, an objective factory.

This module imports only the error family (gpd_train.errors), so every other module may
import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gpd_train.config.horizon import HORIZON_CHAIN, HorizonSchedule
from gpd_train.config.schedule import HALVING, Schedule
from gpd_train.errors import ConfigError

# The guidance stage's id: between stage 0 and stage 1 of a chain that has one.
GUIDANCE_STAGE = "g"
Stage = int | str


@dataclass(frozen=True)
class Chain:
    """One distillation chain.

    ``objective``: ``None`` trains every stage with the online distillation objective
    (``gpd_train.train.objectives.OnlineDistillation``); otherwise a factory
    ``(setup: objectives.DistillSetup, generator, batch_size) -> Objective``.
    """

    name: str  # the --chain value and pipeline_chains entry
    section: str  # its TOML table, e.g. [distill]
    label: str  # its rows in the evaluation report
    folder: str  # its stage folders' parent inside the run folder ("" = the top level)
    seed_offset: int  # its data/noise streams start at seed * 1000 + offset + stage
    summary: str  # one line for --help
    defaults: Mapping[str, Any] = field(default_factory=dict)  # DistillConfig field overrides
    # The evaluation shows every stage of the chain (False: only its final student), and a
    # baseline chain is what the other chains' final students are compared with.
    evaluate_every_stage: bool = True
    baseline: bool = False
    allows_guidance_stage: bool = True
    objective: Callable[..., Any] | str | None = None
    schedule: Schedule = HALVING  # how its stages step (gpd_train.config.plan reads it)

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise ConfigError(f"chain {self.name!r}: schedule must be a "
                             f"gpd_train.config.schedule.Schedule, got {self.schedule!r}")
        if isinstance(self.objective, str) and ":" not in self.objective:
            raise ConfigError(f"chain {self.name!r}: objective must be a factory or "
                             f"'module:function', got {self.objective!r}")

    def objective_factory(self) -> Callable[..., Any] | None:
        """The objective factory; one named as 'module:function' is imported on first use,
        so the registry (and everything that reads it) loads no training code."""
        if not isinstance(self.objective, str):
            return self.objective
        module, _, name = self.objective.partition(":")
        return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, Chain] = {}
CHAINS: Mapping[str, Chain] = MappingProxyType(_REGISTRY)


def register(chain: Chain) -> Chain:
    """Add ``chain`` to the registry; its name and folder must be new."""
    if chain.name in _REGISTRY:
        raise ConfigError(f"chain {chain.name!r} is already registered")
    if any(other.folder == chain.folder for other in _REGISTRY.values()):
        raise ConfigError(f"chain {chain.name!r}: folder {chain.folder!r} is taken")
    _REGISTRY[chain.name] = chain
    return chain


def unregister(name: str) -> None:
    """Remove a chain registered by a plug-in or a test."""
    del _REGISTRY[name]


def get_chain(name: str) -> Chain:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"chain must be one of {chain_names()}, got {name!r}") from None


def chain_names() -> list[str]:
    return list(_REGISTRY)


# The built-in chains. The first is the default (--chain's default, stage 0's owner).
DEFAULT_CHAIN = register(Chain(
    name="gpd", section="distill", label="GPD", folder="", seed_offset=0,
    summary="guidance-free GPD: stage 1 absorbs CFG, then halving")).name
register(Chain(
    name="guided", section="guided", label="GPD-w", folder="guided", seed_offset=200,
    summary="a guidance stage (w as an input), then halving with w as an input",
    # None: the [distill] table's lists, so a run's stage budget is set in one place.
    defaults=MappingProxyType({"guidance_stage": True, "iterations": None,
                               "freq_weight": None})))
register(Chain(
    name="vanilla", section="vanilla", label="vanilla PD", folder="vanilla", seed_offset=100,
    summary="the progressive-distillation ablation: data states, MSE only",
    defaults=MappingProxyType({"state_source": "data", "freq_weight": [0.0, 0.0, 0.0]}),
    evaluate_every_stage=False, baseline=True, allows_guidance_stage=False))
register(Chain(
    name=HORIZON_CHAIN, section="horizon", label="GPD-horizon", folder="horizon",
    seed_offset=300,
    summary="the GPD paper's recipe: stage k jumps horizons[k-1] teacher steps, learning the "
            "previous student's jump plus T0's CFG steps at an annealed scale",
    defaults={"horizons": [2, 3, 4, 5, 6, 7, 8], "iterations": [700] * 7,
              "freq_weight": [0.0] * 6 + [1.0]},
    evaluate_every_stage=False, allows_guidance_stage=False,
    objective="gpd_train.train.horizon:horizon_distillation",
    schedule=HorizonSchedule()))
DEFAULT_PIPELINE = (DEFAULT_CHAIN, "vanilla")  # the chains the embedded demo trains


@dataclass(frozen=True)
class StageId:
    """One stage of a run folder: stage 0 (the base teacher, shared by every chain), a
    chain's guidance stage ``GUIDANCE_STAGE``, or its halving stage 1..N."""

    chain: str
    stage: Stage

    def __post_init__(self) -> None:
        get_chain(self.chain)
        if self.stage == 0:  # one base teacher, whatever chain asks for it
            object.__setattr__(self, "chain", DEFAULT_CHAIN)
        elif self.stage != GUIDANCE_STAGE and not (
                isinstance(self.stage, int) and not isinstance(self.stage, bool)
                and self.stage >= 1):
            raise ConfigError(f"a stage is 0, {GUIDANCE_STAGE!r} or a positive int, got "
                             f"{self.stage!r}")

    @classmethod
    def parse(cls, name: str) -> StageId:
        """The stage of a folder name relative to the run folder (``name``'s inverse)."""
        parent, _, own = name.rpartition("/")
        chain = next((c.name for c in _REGISTRY.values() if c.folder == parent), None)
        if chain is None or not (own == "guidance" or own.removeprefix("stage").isdigit()):
            raise ConfigError(f"{name!r} is not a stage folder of a run (expected stage0, "
                             "stageN, guidance or <chain>/stageN)")
        stage: Stage = GUIDANCE_STAGE if own == "guidance" else int(own.removeprefix("stage"))
        return cls(chain, stage)

    @property
    def is_teacher(self) -> bool:
        return self.stage == 0

    @property
    def is_guidance(self) -> bool:
        return self.stage == GUIDANCE_STAGE

    @property
    def name(self) -> str:
        """The stage folder relative to the run folder."""
        if self.is_teacher:
            return "stage0"
        own = "guidance" if self.is_guidance else f"stage{self.stage}"
        folder = get_chain(self.chain).folder
        return f"{folder}/{own}" if folder else own

    def folder(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / self.name

    def command(self, run_dir: str | Path | None = None) -> str:
        """The command line that (re)runs this stage (of ``run_dir`` when not the default)."""
        chain = "" if self.chain == DEFAULT_CHAIN else f" --chain {self.chain}"
        where = "" if run_dir is None else f" --run-dir {run_dir}"
        return f"python -m gpd_train --stage {self.stage}{chain}{where}"

    def previous(self, has_guidance_stage: bool) -> StageId:
        """The stage whose output is this stage's teacher and its student's start."""
        if self.is_teacher:
            raise ConfigError("stage 0 has no previous stage")
        if self.is_guidance:
            return StageId(self.chain, 0)
        if self.stage == 1 and has_guidance_stage:
            return StageId(self.chain, GUIDANCE_STAGE)
        return StageId(self.chain, int(self.stage) - 1)

    def __str__(self) -> str:
        return self.name


def add_chain_argument(parser: Any, what: str) -> None:
    """``--chain`` for a command line: the registered chains, described from the registry."""
    described = "; ".join(f"{c.name}: {c.summary}" for c in _REGISTRY.values())
    parser.add_argument("--chain", choices=chain_names(), default=DEFAULT_CHAIN,
                        help=f"{what} (default {DEFAULT_CHAIN}). {described}")
