"""Checks made before any work starts, and clear errors for faults while writing.

- The machine's limits: ``--threads`` above the cores this process may use, a batch whose
  activations cannot fit in memory (``activation_floor``), a LoRA rank above the width of
  the layers it adapts, bf16 autocast asked of the CPU.
- The environment: ``GPD_DISABLE_NATIVE`` and ``GPD_DIT_OP_BACKENDS`` values that
  gpd_kernels would not understand.
- Provenance: a ``--teacher`` or ``--base`` other than the Wan folder a run was imported
  from, and a w-conditioned student sampled outside the CFG range it learned.
Every check raises ConfigError (a ValueError and a GPDError); the command lines print it as
``error: ...`` and exit 2. Faults while writing are gpd_train.run.writes'.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gpd_model import DiTConfig
from gpd_train.config.chains import GUIDANCE_STAGE, StageId
from gpd_train.config.settings import RunConfig
from gpd_train.errors import ConfigError
from gpd_train.run.folder import RunFolder
from gpd_train.run.records import RECORD
from gpd_train.run.wan_folder import diffusers_root, expert_folders


# -- the machine ----------------------------------------------------------------------------
def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(threads: int) -> None:
    """Refuse more torch threads than cores: far above it torch's thread pool crashes."""
    cores = available_cores()
    if threads > cores:
        raise ConfigError(f"--threads {threads} exceeds the {cores} CPU cores this process may "
                         f"use: give --threads 1..{cores} (0 = chosen from the load)")


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), None when unlimited/unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or the host's RAM within the cgroup limit."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return total if limit is None else min(total, limit)


def activation_floor(dit: DiTConfig, latent_shape: Sequence[int], batch_size: int,
                     activation_checkpointing: bool, precision: str, sequence: int = 1) -> int:
    """A lower bound on the bytes one training step's saved activations take.

    The rule: the backward needs, for every transformer block, at least its input
    (``dim`` values per token) and, unless blocks are recomputed (activation
    checkpointing), the FFN's hidden activation before and after the GELU
    (``2 * ffn_dim`` per token); tokens = the latent's T x H x W over the patch size;
    2 bytes a value under bf16 autocast, else 4; split over ``sequence`` ranks
    (``--sequence-parallel``) a GPU holds 1/sequence of the tokens (rounded up). Attention,
    the other projections, the optimizer, the teacher and the data are left out, so a real
    step takes several times this: a batch refused by it cannot fit, and no batch that fits
    is refused.
    """
    tokens = math.ceil(math.prod(math.ceil(size / patch) for size, patch in
                                 zip(latent_shape[1:], dit.patch_size, strict=True)) / sequence)
    per_token = dit.dim + (0 if activation_checkpointing else 2 * dit.ffn_dim)
    value_bytes = 2 if precision == "bf16" else 4
    return batch_size * tokens * dit.num_layers * per_token * value_bytes


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


def check_batch_fits(config: RunConfig, dit: DiTConfig, latent_shape: Sequence[int],
                     device: torch.device) -> None:
    """Refuse a batch whose ``activation_floor`` exceeds the device's memory."""
    checkpointing = bool(config.parallel.activation_checkpointing)
    need = activation_floor(dit, latent_shape, config.batch_size, checkpointing,
                            config.precision, config.parallel.sequence)
    have = memory_bytes(device)
    if need > have:
        per_sample = need / config.batch_size
        fits = max(1, int(have // per_sample))
        raise ConfigError(f"--batch-size {config.batch_size} cannot fit: its activations alone "
                         f"take at least {_gib(need)} (gpd_train.run.preflight.activation_floor), "
                         f"the {device.type} has {_gib(have)}; give --batch-size below {fits}"
                         + ("" if checkpointing else " or add --activation-checkpointing"))


def check_lora_width(config: RunConfig, dit: DiTConfig) -> None:
    """Refuse a LoRA rank above the width of the projections it adapts (``dim``: every
    adapted projection maps from or to it), whose update could not use the extra rank."""
    for section, table in config.chain_tables.items():
        rank = table.lora_rank
        if rank > dit.dim:
            raise ConfigError(f"{section}.lora_rank (--lora-rank) {rank} exceeds the width "
                             f"{dit.dim} of the layers it adapts (the model's dim): an update of "
                             f"a {dit.dim}-wide projection has rank <= {dit.dim}; give "
                             f"--lora-rank 1..{dit.dim}")


def check_expert_guidance(config: RunConfig) -> None:
    """Refuse a low expert's stage-teacher CFG scale (``stage_guidance_2``) on a run whose
    teacher is not a Wan2.2 expert pair: it would guide nothing."""
    given = [section for section, table in config.chain_tables.items()
             if table.stage_guidance_2 is not None]
    if given and (config.teacher is None or expert_folders(config.teacher) is None):
        raise ConfigError(f"{given[0]}.stage_guidance_2 (--stage-guidance-2) is the low-noise "
                          "expert's stage-teacher CFG scale of a Wan2.2 pair run, but this "
                          f"run's teacher ({config.teacher or 'trained, preset ' + config.preset}"
                          ") is one model: drop it, or give --teacher a Wan2.2 folder")


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 is autocast on CUDA; the CPU would silently run fp32."""
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError(f"--precision bf16 is bf16 autocast on CUDA; on the {device.type} it "
                         "would run in fp32: drop --precision (or use --device cuda)")


# -- the environment ------------------------------------------------------------------------
def check_environment() -> None:
    """The gpd_kernels environment variables hold values they understand."""
    from gpd_kernels._native import disable_native_error
    from gpd_kernels.dit import environment_backends

    reason = disable_native_error()
    if reason is not None:
        raise ConfigError(reason)
    try:
        environment_backends()
    except ValueError as exc:
        raise ConfigError(f"{exc} (e.g. GPD_DIT_OP_BACKENDS=\"gated_residual=compile\"; unset "
                         "it for the defaults)") from None


# -- provenance -----------------------------------------------------------------------------
def _wan_root(path: str | Path) -> Path:

    return diffusers_root(path).resolve()


def imported_from(run_dir: str | Path) -> Path | None:
    """The Wan folder a run's stage 0 was imported from (its done.json), None when the
    stage was trained here, is missing, or records no source."""
    record = Path(run_dir) / "stage0" / RECORD
    try:
        source = json.loads(record.read_text()).get("imported_from")
    except (OSError, ValueError, AttributeError):
        return None
    return None if not isinstance(source, str) else _wan_root(source)


def check_teacher_matches(config: RunConfig) -> None:
    """Refuse a ``--teacher`` other than the folder the run's stage 0 was imported from:
    the stages after it would be recorded under a teacher they never saw."""
    source = imported_from(config.run_dir)
    if config.teacher is None or source is None or _wan_root(config.teacher) == source:
        return
    stage0 = Path(config.run_dir) / "stage0"
    raise ConfigError(f"--teacher {config.teacher} is not the folder this run's stage 0 was "
                     f"imported from ({source}, recorded in {stage0 / RECORD}): give "
                     f"--teacher {source}, or import the new teacher with `python -m gpd_train "
                     f"--stage 0 --restart --teacher {config.teacher} --run-dir "
                     f"{config.run_dir}` (moves {stage0} aside; later stages become stale)")


def check_base_matches(run_dir: str | Path, base: str | Path) -> None:
    """Refuse an export ``--base`` other than the Wan folder the run was imported from:
    its text encoder and VAE would be linked to a student trained under another's."""
    source = imported_from(run_dir)
    if source is None or _wan_root(base) == source:
        return
    if not source.exists():  # moved since: nothing to compare with, so say what is assumed
        print(f"warning: {run_dir}'s stage 0 was imported from {source}, which no longer "
              f"exists; exporting with --base {base} as its replacement", file=sys.stderr)
        return
    raise ConfigError(f"--base {base} is not the Wan folder this run was trained from ({source}, "
                     f"recorded in {Path(run_dir) / 'stage0' / RECORD}): its text encoder "
                     f"and VAE would not match the student; give --base {source}")


def check_guidance_in_range(record: dict[str, Any] | None, w: float, what: str) -> None:
    """Refuse sampling a w-conditioned student at a CFG scale outside the range it learned
    (its done.json ``options.guidance`` = [low, high]); it never saw such w."""
    options = (record or {}).get("options")
    learned = options.get("guidance") if isinstance(options, dict) else None
    if not (isinstance(learned, list) and len(learned) == 2):
        return
    low, high = (float(v) for v in learned)
    if not low <= w <= high:
        raise ConfigError(f"{what} learned CFG scales {low:g}..{high:g} (its done.json); w = "
                         f"{w:g} is outside that range: give --guidance W with {low:g} <= W <= "
                         f"{high:g}, or retrain the guided chain with a wider --guidance-range")


def check_eval_guidance(run: RunFolder) -> None:
    """Refuse evaluating stages under guidance options other than those they were trained
    with: the reference teacher would be sampled at another CFG scale than the one the
    students absorbed (or, w-conditioned, learned), and the table would not say so."""

    config = run.config
    for chain in config.pipeline_chains:
        stages = [GUIDANCE_STAGE] if run.has_guidance_stage(chain) else []
        stages += range(1, config.stage_count(chain) + 1)
        for sid in (StageId(chain, stage) for stage in stages):
            if not run.is_done(sid):
                continue
            options = run.record(sid).get("options")
            if not isinstance(options, dict) or "guidance" not in options:
                continue  # recorded before options were kept
            now = run.plan(sid).guidance
            if options["guidance"] != now:
                raise ConfigError(
                    f"{sid} was trained at guidance {options['guidance']} (its done.json); "
                    f"this evaluation's options give {now}, and would compare it against the "
                    f"teacher at CFG {config.resolved_guidance:g}: give the guidance options "
                    "the run was trained with (--guidance, --stage-guidance, --guidance-range or "
                    "the --config file)")
