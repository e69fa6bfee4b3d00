"""A Wan2.2 expert pair as a run folder stores it.

A run whose teacher is a Wan2.2 A14B Diffusers folder (gpd_train.run.wan_folder
``expert_folders``) distils a *pair*: every stage, stage 0 included, holds two experts of one
shape, the high-noise one for sigma >= the boundary and the low-noise one below.

Storage: one ``model.safetensors`` per stage, as for one model, holding both experts' tensors
under the prefixes ``high.`` and ``low.``, and the boundary in its metadata
(``expert_boundary``). One file keeps everything a stage output is checked by as it is: the
SHA-256 in done.json covers both experts (a stage is stale when either changed), ``--resume``
keeps or refuses it whole, and ``--restart`` moves it aside whole. A distillation stage
trains its experts one after the other (gpd_train.train.pair), each phase in its own
sub-folder (``stage1/high/``, ``stage1/low/``: ``ckpt/``, ``metrics.jsonl`` and, once the phase
is done, ``expert.safetensors``, its EMA weights). A LoRA pair stage stores its two adapters
so (gpd_train.run.lora's layout under the same prefixes, the spec in the metadata), each
applied to its expert of stage 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpd_train.errors import GPDError

EXPERTS = ("high", "low")  # in training order, and the order of ExpertPair's fields
BOUNDARY_KEY = "expert_boundary"  # a pair stage output's metadata: the boundary sigma
PHASE_OUTPUT = "expert.safetensors"  # a finished phase's EMA weights, in its sub-folder
# diffusers' WanPipeline component of each expert
COMPONENT = {"high": "transformer", "low": "transformer_2"}


class ExpertPairError(GPDError, ValueError):
    """A stage output that does not hold the two experts a pair run expects."""


def join_experts(high: dict[str, torch.Tensor],
                 low: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One state dict of both experts, each key under its expert's prefix."""
    return {f"{name}.{key}": value for name, state in zip(EXPERTS, (high, low), strict=True)
            for key, value in state.items()}


def split_experts(state: dict[str, torch.Tensor],
                  source: object) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(high, low) state dicts of a pair's joined ``state`` (from ``source``, for errors)."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in EXPERTS}
    stray = []
    for key, value in state.items():
        name, _, rest = key.partition(".")
        if name in parts and rest:
            parts[name][rest] = value
        else:
            stray.append(key)
    empty = [name for name, part in parts.items() if not part]
    if stray or empty:
        raise ExpertPairError(f"{source} does not hold an expert pair (every key under "
                              f"'high.' or 'low.', both present): {len(stray)} key(s) outside "
                              f"them (e.g. {stray[:2]}), expert(s) missing: {empty}")
    return parts["high"], parts["low"]


@dataclass(frozen=True)
class ExpertPhase:
    """One expert's phase of a pair's distillation stage: it trains on the student starts
    ``first .. first + count - 1`` (those whose sigma is on its side of the boundary) for
    ``iterations`` updates, in the sub-folder ``name``."""

    name: str
    first: int
    count: int
    iterations: int


def expert_phases(starts: torch.Tensor, boundary: float, iterations: int) -> list[ExpertPhase]:
    """The high expert's phase, then the low one's, over a student grid's ``starts`` (its
    sigmas but the last, decreasing). Each phase gets the stage's ``iterations`` in
    proportion to its starts, so each start sigma gets the updates it gets in a one-model
    stage (rollout lanes visit the starts evenly)."""
    high = int((starts >= boundary).sum())  # ExpertPair.is_high's test, on the same tensor
    high_iterations = round(iterations * high / len(starts))
    return [ExpertPhase("high", 0, high, high_iterations),
            ExpertPhase("low", high, len(starts) - high, iterations - high_iterations)]
