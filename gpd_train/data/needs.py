"""Which stages a data set can train, decided before any stage runs.

Two things draw data latents (VAE latents of real videos): training stage 0 (rather than
importing it with ``--teacher``) and the ``data`` state source, the vanilla ablation
chain's default. Prompt embeddings encoded from a prompts file (``--prompts``) carry none,
so on them the embedded pipeline trains every chain that needs no latents and skips the
others with one line each; a single ``--stage`` that needs them is refused up front.
"""

from __future__ import annotations

from typing import Protocol

from gpd_train.config.chains import StageId, get_chain
from gpd_train.config.settings import RunConfig
from gpd_train.errors import ConfigError


class DataSet(Protocol):
    has_latents: bool


def latents_use(config: RunConfig, sid: StageId) -> str | None:
    """What in stage ``sid`` draws data latents (None: nothing does)."""
    chain = sid.chain
    if sid.is_teacher:
        return None if config.teacher is not None else (
            "training stage 0 (import the teacher instead with --teacher W)")
    if config.chain(chain).state_source == "data":
        return (f"the {chain} chain's state_source 'data' (data states; set "
                f"[{get_chain(chain).section}] state_source = 'teacher' or 'student' to train "
                "it on prompt embeddings)")
    return None


def missing_latents(config: RunConfig, data: DataSet, sid: StageId) -> str | None:
    """Why stage ``sid`` cannot train on ``data``, None when it can."""
    use = latents_use(config, sid)
    if data.has_latents or use is None:
        return None
    return f"the data set {config.data} holds prompt embeddings without latents, needed by {use}"


def trainable_chains(config: RunConfig, data: DataSet,
                     plan: list[StageId]) -> tuple[list[str], list[str]]:
    """(the chains of ``config.pipeline_chains`` whose every stage in ``plan``, the stages
    still to train, can train on ``data``, one line for each chain skipped); refused when
    stage 0 or every chain cannot."""
    skipped: dict[str, str] = {}
    for sid in plan:
        reason = missing_latents(config, data, sid)
        if reason is not None and sid.is_teacher:
            raise ConfigError(f"stage 0 cannot train: {reason}")
        if reason is not None:
            skipped.setdefault(sid.chain, reason)
    kept = [chain for chain in config.pipeline_chains if chain not in skipped]
    if not kept:
        raise ConfigError(f"no chain of pipeline_chains {config.pipeline_chains} can train: "
                         + "; ".join(skipped.values()))
    return kept, [f"[{chain}] skipped: {reason}" for chain, reason in skipped.items()]
