"""Which stages a data set can train, decided before any stage runs.

Two things draw data latents (VAE latents of real videos): training stage 0 (rather than
importing it with ``--teacher``) and the ``data`` state source, the vanilla ablation
chain's default. Prompt embeddings encoded from a prompts file (``--prompts``) carry none,
so on them the embedded pipeline trains every chain that needs no latents and skips the
others with one line each; a single ``--stage`` that needs them is refused up front.
"""

from __future__ import annotations

from typing import Protocol

from .config import SECTION, RunConfig


class DataSet(Protocol):
    has_latents: bool


def latents_use(config: RunConfig, chain: str, stage: int | str) -> str | None:
    """What in ``stage`` of ``chain`` draws data latents (None: nothing does)."""
    if stage == 0:
        return None if config.teacher is not None else (
            "training stage 0 (import the teacher instead with --teacher W)")
    if config.chain(chain).state_source == "data":
        return (f"the {chain} chain's state_source 'data' (data states; set "
                f"[{SECTION[chain]}] state_source = 'teacher' or 'student' to train it on "
                "prompt embeddings)")
    return None


def missing_latents(config: RunConfig, data: DataSet, chain: str,
                    stage: int | str) -> str | None:
    """Why ``stage`` of ``chain`` cannot train on ``data``, None when it can."""
    use = latents_use(config, chain, stage)
    if data.has_latents or use is None:
        return None
    return f"the data set {config.data} holds prompt embeddings without latents, needed by {use}"


def trainable_chains(config: RunConfig, data: DataSet,
                     plan: list[tuple[str, int | str]]) -> tuple[list[str], list[str]]:
    """(the chains of ``config.pipeline_chains`` whose every stage in ``plan``, the stages
    still to train, can train on ``data``, one line for each chain skipped); refused when
    stage 0 or every chain cannot."""
    skipped: dict[str, str] = {}
    for chain, stage in plan:
        reason = missing_latents(config, data, chain, stage)
        if reason is not None and stage == 0:
            raise ValueError(f"stage 0 cannot train: {reason}")
        if reason is not None:
            skipped.setdefault(chain, reason)
    kept = [chain for chain in config.pipeline_chains if chain not in skipped]
    if not kept:
        raise ValueError(f"no chain of pipeline_chains {config.pipeline_chains} can train: "
                         + "; ".join(skipped.values()))
    return kept, [f"[{chain}] skipped: {reason}" for chain, reason in skipped.items()]
