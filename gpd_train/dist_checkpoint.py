"""Sharded checkpoints with torch.distributed.checkpoint (DCP) and the consolidated stage export.

Under torchrun a stage's checkpoints are DCP folders in the usual place
(``<stage>/ckpt/step-NNNNNNNN/``, same ``latest`` pointer and pruning as
gpd_train.checkpoint) holding DCP's per-rank shard files, its ``.metadata`` and
``manifest.json`` (format, step, data streams, per-stream batch, the run metadata, file
sizes). Entries: ``model`` and ``optimizer`` (FQN keys, sharded), ``ema`` (the EMA
DTensors, same keys), ``trainer`` (step, EMA update count) and one ``stream.<j>`` per data
stream (its generator state and rollout lanes, written by the rank that runs it).

All ranks write into a temporary folder; rank 0 then renames it into place and moves the
pointer, so a rank killed at any moment leaves the previous checkpoint as the latest. DCP
reshards on load: a checkpoint from N ranks resumes on M ranks, or in one process without
torchrun, as long as the data streams and their batch are the same (the global batch).

The stage output is gathered tensor by tensor to rank 0, which writes the trainer's
``model.safetensors`` (what the next stage and the sampler read) and a diffusers folder
(``diffusers/``: diffusion_pytorch_model.safetensors + config.json).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gpd_model import (
    DiTConfig,
    WanDiT,
    add_guidance_input,
    fold_guidance,
    has_guidance_input,
    save_diffusers,
)

from . import parallel
from .checkpoint import CheckpointError, CheckpointStore, atomic_write_text, check_run_metadata
from .parallel import StreamGroup

if TYPE_CHECKING:  # both import this module lazily, when a checkpoint is sharded
    from .loop import StageTrainer
    from .pipeline import Run

FORMAT = "dcp"
MANIFEST = "manifest.json"
DIFFUSERS_FOLDER = "diffusers"
_DCP_METADATA = ".metadata"


def is_dcp(path: Path | None) -> bool:
    """True when ``path`` is a DCP checkpoint folder."""
    return path is not None and (Path(path) / _DCP_METADATA).is_file()


def _streams(trainer: StageTrainer) -> list[tuple[int, torch.Generator, Any]]:
    objective = trainer.objective
    if isinstance(objective, StreamGroup):
        return list(zip(objective.ids, objective.generators, objective.objectives, strict=True))
    return [(0, trainer.generator, objective)]


def _layout(trainer: StageTrainer) -> dict[str, int]:
    streams = _streams(trainer)
    return {"data_streams": len(streams) * parallel.world().world_size,
            "stream_batch": int(streams[0][2].batch_size)}


def _state(trainer: StageTrainer) -> dict[str, Any]:
    """The live state DCP writes from / reads into (the model's and optimizer's DTensors)."""
    state: dict[str, Any] = {
        "model": get_model_state_dict(trainer.model),
        "ema": trainer.ema.shadow,
        "optimizer": get_optimizer_state_dict(trainer.model, trainer.optimizer),
        "trainer": {"step": trainer.step, "ema_updates": trainer.ema.updates},
    }
    for stream, _, _ in _streams(trainer):
        state[f"stream.{stream}"] = io.BytesIO()
    return state


def _fresh_folder(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def save(trainer: StageTrainer) -> Path:
    """Write ``trainer``'s checkpoint at its current step (a collective) and return it."""
    state = _state(trainer)
    for stream, generator, objective in _streams(trainer):
        torch.save({"rng": generator.get_state(), "stream": objective.stream_state()},
                   state[f"stream.{stream}"])
    store: CheckpointStore = trainer.checkpoints
    name = f"step-{trainer.step:08d}"
    tmp = store.folder / f".tmp-{name}-{FORMAT}"
    parallel.main_only(_fresh_folder, tmp)
    dcp.save(state, checkpoint_id=str(tmp))
    manifest = {"format": FORMAT, "step": trainer.step,
                "world_size": parallel.world().world_size, **_layout(trainer),
                "metadata": trainer.metadata}
    return parallel.main_only(_publish, store, tmp, name, manifest)


def _publish(store: CheckpointStore, tmp: Path, name: str, manifest: dict[str, Any]) -> Path:
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
    atomic_write_text(tmp / MANIFEST, json.dumps({**manifest, "files": files}, indent=1))
    final = store.folder / name
    if final.exists():  # left by a run that was restarted from an earlier step
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(store._pointer, name)  # also fsyncs the folder, making the rename durable
    store._prune(keep=name)
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of DCP checkpoint ``path``, its files' sizes verified."""
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
        if manifest["format"] != FORMAT:
            raise ValueError(f"format {manifest['format']!r}, expected {FORMAT!r}")
        int(manifest["step"]), int(manifest["data_streams"]), int(manifest["stream_batch"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"corrupt checkpoint manifest {manifest_path}: {exc}") from None
    for name, size in files.items():
        file = Path(path) / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {file} is corrupt ({file.stat().st_size} "
                                  f"bytes, the manifest says {size})")
    return manifest


def _check_model_keys(path: Path, state: dict[str, Any]) -> None:
    """Refuse before reading anything when model/EMA keys or shapes differ."""
    stored = {key: tuple(meta.size)
              for key, meta in dcp.FileSystemReader(str(path)).read_metadata()
              .state_dict_metadata.items()
              if key.startswith(("model.", "ema.")) and hasattr(meta, "size")}
    expected = {f"{part}.{key}": tuple(value.shape)
                for part in ("model", "ema") for key, value in state[part].items()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = [f"{k}: checkpoint {stored[k]}, model {expected[k]}"
                  for k in sorted(set(stored) & set(expected)) if stored[k] != expected[k]]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"checkpoint {path} does not match the model; nothing was loaded.\n"
            f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n"
            f"  mismatched: {mismatched}")


def restore(trainer: StageTrainer, path: Path) -> None:
    """Load DCP checkpoint ``path`` into ``trainer`` on any number of ranks (a collective)."""
    if not is_dcp(path):
        raise CheckpointError(f"checkpoint {path} was written by a single-process run: resume "
                              "it without torchrun, or start the stage over with --restart")
    manifest = read_manifest(path)
    check_run_metadata(path, manifest["metadata"], trainer.metadata)
    layout = _layout(trainer)
    saved = {key: int(manifest[key]) for key in layout}
    if saved != layout:
        ranks = parallel.world().world_size
        raise ValueError(
            f"checkpoint {path} has {saved['data_streams']} data streams of "
            f"{saved['stream_batch']} samples (global batch "
            f"{saved['data_streams'] * saved['stream_batch']}); this run has "
            f"{layout['data_streams']} of {layout['stream_batch']}. On {ranks} rank(s) pass "
            f"--data-streams {saved['data_streams']} --batch-size "
            f"{saved['data_streams'] * saved['stream_batch'] // ranks}")
    state = _state(trainer)
    _check_model_keys(path, state)
    dcp.load(state, checkpoint_id=str(path), no_dist=not parallel.world().distributed)
    set_model_state_dict(trainer.model, state["model"])
    set_optimizer_state_dict(trainer.model, trainer.optimizer, state["optimizer"])
    trainer.ema.updates = int(state["trainer"]["ema_updates"])
    trainer.step = int(state["trainer"]["step"])
    for stream, generator, objective in _streams(trainer):
        blob = state[f"stream.{stream}"]
        blob.seek(0)
        saved_stream = torch.load(blob, map_location="cpu", weights_only=True)
        generator.set_state(saved_stream["rng"])
        objective.load_stream_state(saved_stream["stream"])


# -- the stage output -------------------------------------------------------------------
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


def _write_stage_output(run: Run, chain: str, stage: int, weights: dict[str, torch.Tensor],
                        summary: dict[str, Any]) -> Path:
    export_diffusers(run.dit_config, weights, run.stage_folder(chain, stage) / DIFFUSERS_FOLDER,
                     run.config.resolved_guidance)
    return run.finish_stage(chain, stage, weights, summary)  # done.json last


def finish_stage(run: Run, chain: str, stage: int, ema_state: dict[str, torch.Tensor],
                 summary: dict[str, Any]) -> Path:
    """The stage output from the (possibly sharded) EMA: ``run.finish_stage`` in one
    process; under torchrun gathered to rank 0, which also writes the diffusers folder."""
    if not parallel.world().distributed:
        return run.finish_stage(chain, stage, ema_state, summary)
    gathered = {}
    for key, value in ema_state.items():  # one tensor at a time: peak = one full tensor
        full = parallel.full_value(value).detach()
        if parallel.is_main():
            gathered[key] = full.cpu()
    return parallel.main_only(_write_stage_output, run, chain, stage, gathered, summary)
