"""Atomic checkpoints of a training stage: one component for one process and for torchrun.

A ``Checkpointer`` saves and loads a dict of stateful parts together (torchtitan's shape):
``model`` and ``ema`` (flat name -> tensor dicts), ``optimizer``, ``trainer`` (step, EMA
update count) and one ``stream.<j>`` per data stream (its generator and rollout state),
each with ``state_dict``/``load_state_dict``. A checkpoint is a folder
``<stage>/ckpt/step-NNNNNNNN/`` holding the parts and ``manifest.json`` (format, step,
the run metadata, the data-stream layout and the size of every file):

- one process writes the ``safetensors`` format: ``model.safetensors``,
  ``ema.safetensors``, ``state.pt`` (the other parts) and each file's SHA-256;
- under torchrun every rank writes its shards with torch.distributed.checkpoint (the
  ``dcp`` format, sizes only: hashing would read the whole checkpoint at every save). DCP
  reshards on load: N ranks resume on M ranks, or in one process, as long as the data
  streams and their batch (the global batch) are the same.

A checkpoint is written under a temporary name and renamed into place; only then does
the ``latest`` pointer (itself replaced atomically) move to it, so a crash at any moment
leaves the previous checkpoint as the one that loads. Loading takes the newest checkpoint
that verifies, checks it was written for this run (stage, model shape, stage teacher,
layout) and that every part's tensors match, and only then loads the parts.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

# One error for every checkpoint problem, model files and trainer checkpoints alike.
from gpd_model import CheckpointError
from gpd_train import parallel
from gpd_train.run.checkpoint_store import (
    DCP_FORMAT,
    MANIFEST,
    SINGLE_FORMAT,
    STATE_FILE,
    CheckpointStore,
    CorruptStateError,
    _fresh_folder,
)
from gpd_train.run.files import (
    Signature,
    _signature,
    load_weights,
    save_weights,
    signature_mismatch,
)
from gpd_train.run.writes import writing

# Parts that are flat name -> tensor dicts: safetensors files in one process, and the
# parts whose keys, shapes and dtypes are checked before anything is loaded.
WEIGHT_PARTS = ("model", "ema")
# "stream.<j>" is data stream j; under torchrun only the rank running it has the part.
STREAM_PREFIX = "stream."





class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...




































def _owner(key: str, parts: Mapping[str, Any]) -> str | None:
    """The part a flattened DCP key belongs to ("model.blocks.0..." -> "model")."""
    return next((name for name in parts if key == name or key.startswith(name + ".")), None)


def _blob(state: dict[str, Any]) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer


class Checkpointer(CheckpointStore):
    """Saves and loads the stateful ``parts`` of a training stage together, in ``folder``.

    ``metadata`` (stage, model shape, stage teacher) goes into every checkpoint, and a
    checkpoint written for other values is refused; so is one whose data-stream layout
    (the ``stream.<j>`` parts over all ranks, ``stream_batch`` samples each) differs, or
    whose ``recipe`` (option name -> value: every option that shapes the stage's result)
    has another value for an option both record.
    """

    def __init__(self, folder: str | Path, parts: Mapping[str, Stateful],
                 metadata: Mapping[str, str], stream_batch: int,
                 recipe: Mapping[str, Any] | None = None) -> None:
        super().__init__(folder)
        self.parts = dict(parts)
        self.metadata = dict(metadata)
        self.stream_batch = stream_batch
        # As the manifest's JSON gives it back (tuples become lists), to compare equal.
        self.recipe: dict[str, Any] = json.loads(json.dumps(dict(recipe or {})))

    def _layout(self) -> dict[str, int]:
        streams = sum(name.startswith(STREAM_PREFIX) for name in self.parts)
        return {"data_streams": streams * parallel.world().data_ranks,
                "stream_batch": self.stream_batch}

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Write the parts as checkpoint ``step`` and make it the latest (a collective under
        torchrun); older checkpoints are pruned."""
        world = parallel.world()
        name = f"step-{step:08d}"
        tmp = self.folder / f".tmp-{name}"
        parallel.main_only(_fresh_folder, tmp)
        if world.distributed:
            import torch.distributed.checkpoint as dcp

            dcp.save({part: _blob(value.state_dict()) if part.startswith(STREAM_PREFIX)
                      else value.state_dict() for part, value in self.parts.items()},
                     checkpoint_id=str(tmp))
        else:
            meta = {**self.metadata, "step": str(step)}
            for part in WEIGHT_PARTS:
                save_weights(tmp / f"{part}.safetensors", self.parts[part].state_dict(), meta)
            # Through a Python file: torch's own writer reports a full disk as an
            # opaque RuntimeError, a Python write as OSError ENOSPC.
            with writing(tmp / STATE_FILE), (tmp / STATE_FILE).open("wb") as handle:
                torch.save({part: value.state_dict() for part, value in self.parts.items()
                            if part not in WEIGHT_PARTS}, handle)
        manifest = {"format": DCP_FORMAT if world.distributed else SINGLE_FORMAT,
                    "step": step, "world_size": world.world_size, **self._layout(),
                    "metadata": self.metadata, "recipe": self.recipe}
        return parallel.main_only(self.publish, tmp, name, manifest)

    # -- loading --------------------------------------------------------------------------
    def load(self) -> tuple[Path, list[str]]:
        """Load the newest checkpoint that verifies into the parts (a collective under
        torchrun): all of them, or none when it was written for another run or a part does
        not match. Returns its folder and why newer ones were passed over."""
        problems: list[str] | None = None
        while True:
            path, manifest, problems = parallel.main_only(self.newest_valid, problems)
            self._check_run(path, manifest)
            if manifest["format"] == DCP_FORMAT:
                saved = self._read_dcp(path, manifest)
                break
            try:
                saved = self._read_single(path, manifest)
                break
            except CorruptStateError as exc:  # its files match a manifest forged with them
                problems = [*problems, parallel.main_only(self.set_aside, path, str(exc))]
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])
        return path, problems

    def _check_run(self, path: Path, manifest: dict[str, Any]) -> None:
        """Refuse a checkpoint of another format, stage, model shape, stage teacher or
        data-stream layout."""
        fmt = manifest.get("format")
        if fmt not in (SINGLE_FORMAT, DCP_FORMAT):
            raise CheckpointError(
                f"checkpoint {path} was written by an earlier gpd_train (format {fmt!r}; this "
                f"one reads {SINGLE_FORMAT!r} and {DCP_FORMAT!r}); finish the stage with that "
                "version, or start it over with --restart (moves it aside)")
        if fmt == SINGLE_FORMAT and parallel.world().distributed:
            raise CheckpointError(f"checkpoint {path} was written by a single-process run: "
                                  "resume it without torchrun, or start the stage over with "
                                  "--restart")
        self._check_written_for(path, manifest["metadata"], manifest.get("recipe", {}))
        layout = self._layout()
        stored = {key: int(manifest[key]) for key in layout}
        if stored != layout:
            ranks = parallel.world().data_ranks  # sequence groups count once
            raise CheckpointError(
                f"checkpoint {path} has {stored['data_streams']} data streams of "
                f"{stored['stream_batch']} samples (global batch "
                f"{stored['data_streams'] * stored['stream_batch']}); this run has "
                f"{layout['data_streams']} of {layout['stream_batch']}. On {ranks} rank(s) "
                f"pass --data-streams {stored['data_streams']} --batch-size "
                f"{stored['data_streams'] * stored['stream_batch'] // ranks}")

    def _check_written_for(self, path: Path, saved: Mapping[str, str],
                           recipe: Mapping[str, Any]) -> None:
        """Refuse a checkpoint of another stage, model shape or stage teacher, then one
        trained under another recipe."""
        for key in ("stage", "dit_config", "teacher_sha256"):
            if key == "teacher_sha256" and (key not in saved or key not in self.metadata):
                continue  # a checkpoint from before teachers were recorded
            if saved.get(key) != self.metadata.get(key):
                raise CheckpointError(
                    f"checkpoint {path} was written for {key}={saved.get(key)!r}, this run "
                    f"has {self.metadata.get(key)!r}; start the stage over with --restart "
                    "(moves it aside)")
        self._check_recipe(path, recipe)

    def check_recipe(self) -> None:
        """Refuse resuming another stage, teacher or recipe than the newest checkpoint's
        before anything is written (from its manifest alone: loading verifies the files and
        checks again)."""
        for path in self.candidates()[:1]:
            try:
                manifest = json.loads((path / MANIFEST).read_text())
                saved, recipe = dict(manifest["metadata"]), dict(manifest.get("recipe", {}))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return  # an unreadable manifest: loading falls back and names it
            self._check_written_for(path, saved, recipe)

    def _check_recipe(self, path: Path, saved: Mapping[str, Any]) -> None:
        """Refuse a checkpoint trained under other options: resuming it would change the
        stage mid-way (its schedule, grid, loss or data). Options a checkpoint does not
        record (one written before recipes were kept) are not compared."""
        changed = [f"{key} = {saved[key]!r} in the checkpoint, {value!r} in this run"
                   for key, value in sorted(self.recipe.items())
                   if key in saved and saved[key] != value]
        if changed:
            raise CheckpointError(
                f"checkpoint {path} was trained with other options than this run: "
                f"{'; '.join(changed)}. Resume with the checkpoint's values (drop the flags or "
                "TOML keys that changed them), or start the stage over with --restart (moves "
                "it aside)")

    def _check_parts(self, path: Path, stored: Mapping[str, Signature | None]) -> None:
        """Refuse, before anything is loaded, a checkpoint that lacks a part or holds an
        unknown one, or whose weight parts differ in keys, shapes or dtypes. ``stored``:
        each part's tensor signature (weight parts) or None."""
        missing = sorted(set(self.parts) - set(stored))
        # Other ranks' data streams are in a DCP checkpoint too; the layout check covers them.
        unexpected = sorted(name for name in set(stored) - set(self.parts)
                            if not name.startswith(STREAM_PREFIX))
        problems = [f"parts: missing {missing}, unexpected {unexpected}"] if (
            missing or unexpected) else []
        for name in WEIGHT_PARTS:
            if stored.get(name) is not None:
                problem = signature_mismatch(_signature(self.parts[name].state_dict()),
                                             stored[name])
                if problem is not None:
                    problems.append(f"part {name!r}:\n{problem}")
        if problems:
            raise CheckpointError(f"checkpoint {path} does not match this run; nothing was "
                                  "loaded.\n" + "\n".join(problems))

    def _read_single(self, path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        saved: dict[str, Any] = {name.removesuffix(".safetensors"): load_weights(path / name)
                                 for name in manifest["files"] if name.endswith(".safetensors")}
        try:
            saved.update(torch.load(path / STATE_FILE, map_location="cpu", weights_only=True))
        except Exception as exc:  # torch raises several types for a bad pickle
            # Its first line: torch's advice on unpickling does not apply to a corrupt file.
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise CorruptStateError(f"corrupt trainer state {path / STATE_FILE}: "
                                    f"{reason}") from None
        self._check_parts(path, {name: _signature(value) if name in WEIGHT_PARTS else None
                                 for name, value in saved.items()})
        return saved

    def _read_dcp(self, path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        entries = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        signatures: dict[str, Signature] = {name: {} for name in WEIGHT_PARTS}
        present = set()
        for key, meta in entries.items():
            # A stream's state is one pickled entry, "stream.<j>"; others are flattened.
            name = _owner(key, self.parts) or (
                key if key.startswith(STREAM_PREFIX) else key.split(".")[0])
            present.add(name)
            if name in WEIGHT_PARTS:
                signatures[name][key[len(name) + 1:]] = (tuple(meta.size), meta.properties.dtype)
        stored = {name: signatures.get(name) for name in present}
        self._check_parts(path, stored)
        # DCP loads into the parts' own (possibly sharded) tensors; streams are pickled.
        state = {name: io.BytesIO() if name.startswith(STREAM_PREFIX) else part.state_dict()
                 for name, part in self.parts.items()}
        dcp.load(state, checkpoint_id=str(path), no_dist=not parallel.world().distributed)
        for name, value in state.items():
            if isinstance(value, io.BytesIO):
                value.seek(0)
                state[name] = torch.load(value, map_location="cpu", weights_only=True)
        return state
