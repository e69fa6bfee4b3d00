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

import hashlib
import io
import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# One error for every checkpoint problem, model files and trainer checkpoints alike.
from gpd_model import CheckpointError, add_guidance_input

from . import parallel
from .writes import writing

KEEP_CHECKPOINTS = 2
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
SINGLE_FORMAT, DCP_FORMAT = "safetensors", "dcp"
# Parts that are flat name -> tensor dicts: safetensors files in one process, and the
# parts whose keys, shapes and dtypes are checked before anything is loaded.
WEIGHT_PARTS = ("model", "ema")
# "stream.<j>" is data stream j; under torchrun only the rank running it has the part.
STREAM_PREFIX = "stream."
_DCP_METADATA = ".metadata"

Signature = dict[str, tuple[tuple[int, ...], torch.dtype]]


class CorruptStateError(CheckpointError):
    """A checkpoint's trainer state (state.pt) cannot be read, though its files verify."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _fsync_dir(folder: Path) -> None:
    if os.name == "posix":
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, partial=tmp):
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def _sort_metadata(handle: io.BufferedRandom, path: Path) -> None:
    """Rewrite the header of the safetensors file open in ``handle`` with its metadata keys
    sorted, in place.

    safetensors keeps the metadata in a hash map whose order changes from process to
    process, so identical tensors gave files of different SHA-256, the hash that stage
    provenance compares. Reordering keys keeps the header's length, so the tensor data
    stays where it is.
    """
    size = struct.unpack("<Q", handle.read(8))[0]
    raw = handle.read(size)
    header = json.loads(raw)
    if "__metadata__" in header:  # keeps its place: only its keys move
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) != len(raw.rstrip(b" ")):
        raise CheckpointError(f"cannot sort the metadata of {path}: its header is not in "
                              "safetensors' compact JSON form")
    handle.seek(8)
    handle.write(text.ljust(size))


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save tensors as safetensors at ``path`` atomically; identical tensors and metadata
    give a byte-identical file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, partial=tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        with tmp.open("r+b") as handle:
            _sort_metadata(handle, tmp)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning any read failure into a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt weights file {path}: {exc}") from None


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt weights file {path}: {exc}") from None


def load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor],
               source: str | Path) -> None:
    """Load ``state`` into ``module`` only if keys, shapes and dtypes all match."""
    load_exact_state(module.state_dict(), state, source)


# A stage output's metadata says whether its model has a guidance input ("1") or not.
GUIDANCE_INPUT_KEY = "guidance_input"


def load_stage_output(model: torch.nn.Module, path: Path,
                      meta: dict[str, str]) -> torch.nn.Module:
    """Load stage output ``path`` (metadata ``meta``) into ``model``, all or nothing, first
    giving the model a guidance input when the stage's model had one; returns the model."""
    if meta.get(GUIDANCE_INPUT_KEY) == "1":
        add_guidance_input(model)
    load_exact(model, load_weights(path), path)
    return model


def _signature(tensors: Mapping[str, torch.Tensor]) -> Signature:
    return {key: (tuple(value.shape), value.dtype) for key, value in tensors.items()}


def signature_mismatch(expected: Mapping[str, tuple], stored: Mapping[str, tuple]) -> str | None:
    """The keys, and the shapes and dtypes (or whatever each key's tuple holds) by which
    ``stored`` differs from ``expected``, or None."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = [f"{k}: checkpoint {' '.join(map(str, stored[k]))}, model "
                  f"{' '.join(map(str, expected[k]))}" for k in sorted(set(expected) & set(stored))
                  if stored[k] != expected[k]]
    if not (missing or unexpected or mismatched):
        return None
    return (f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n"
            f"  mismatched: {mismatched}")


def load_exact_state(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     source: str | Path) -> None:
    """Copy ``state`` into ``target``'s tensors, all or nothing: keys/shapes/dtypes must match."""
    problem = signature_mismatch(_signature(target), _signature(state))
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {source} does not match the model; nothing was loaded.\n{problem}")
    with torch.no_grad():
        for key, value in target.items():
            value.copy_(state[key])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_dcp(path: Path | None) -> bool:
    """True when ``path`` is a checkpoint folder written under torchrun (DCP)."""
    return path is not None and (Path(path) / _DCP_METADATA).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``, after checking every file it lists against it."""
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        int(manifest["step"])
        # DCP manifests record sizes only, one-process ones sizes and SHA-256s.
        files = {name: (info, None) if isinstance(info, int) else
                 (int(info["bytes"]), str(info["sha256"]))
                 for name, info in dict(manifest["files"]).items()}
        if manifest.get("format") in (SINGLE_FORMAT, DCP_FORMAT):
            dict(manifest["metadata"])
            dict(manifest.get("recipe", {}))
            int(manifest["data_streams"]), int(manifest["stream_batch"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"corrupt checkpoint manifest {manifest_path}: {exc}") from None
    for name, (size, digest) in files.items():
        file = Path(path) / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {file} is corrupt ({file.stat().st_size} "
                                  f"bytes, the manifest says {size})")
        if digest is not None and sha256_file(file) != digest:
            raise CheckpointError(f"checkpoint file {file} is corrupt (its SHA-256 differs "
                                  "from the manifest)")
    return manifest


def _fresh_folder(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


class CheckpointStore:
    """The rolling checkpoint folders of one training stage, in ``folder``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def _pointer(self) -> Path:
        return self.folder / "latest"

    def latest(self) -> Path | None:
        """The folder of the newest complete checkpoint, or None."""
        if not self._pointer.is_file():
            return None
        target = self.folder / self._pointer.read_text().strip()
        if not target.is_dir():
            raise CheckpointError(f"{self._pointer} points to {target}, which does not exist")
        return target

    def steps(self) -> list[Path]:
        """Every checkpoint folder, newest first (verified or not)."""
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.iterdir()
                       if p.name.startswith("step-") and p.is_dir()), reverse=True)

    def candidates(self) -> list[Path]:
        """Where to resume from, in order: the ``latest`` pointer's target, then the rest."""
        try:
            pointed = self.latest()
        except (CheckpointError, OSError, UnicodeDecodeError):
            pointed = None
        rest = [p for p in self.steps() if p != pointed]
        return ([pointed] if pointed is not None else []) + rest

    def newest_valid(self, passed_over: list[str] | None = None
                     ) -> tuple[Path, dict[str, Any], list[str]]:
        """(path, manifest, problems) of the newest checkpoint whose files verify.

        ``problems`` says why the ``latest`` pointer and any newer checkpoint were passed
        over (after ``passed_over``, those set aside before); those checkpoints are renamed
        ``corrupt-step-*`` (kept, never pruned) so that a resumed run's next save cannot
        overwrite them.
        """
        problems = list(passed_over or [])
        try:
            if self.latest() is None and passed_over is None:
                problems.append(f"{self._pointer} is missing")
        except (CheckpointError, OSError, UnicodeDecodeError) as exc:
            if passed_over is None:  # else it pointed to the checkpoint set aside
                problems.append(str(exc))
        for path in self.candidates():
            try:
                return path, read_manifest(path), problems
            except CheckpointError as exc:
                problems.append(self.set_aside(path, str(exc)))
        raise CheckpointError(f"no checkpoint in {self.folder} verifies:\n  "
                              + "\n  ".join(problems)
                              + "\nstart the stage over with --restart (moves it aside)")

    @staticmethod
    def set_aside(path: Path, problem: str) -> str:
        """Rename corrupt checkpoint ``path`` to ``corrupt-<name>``; ``problem``, saying so."""
        aside = path.with_name(f"corrupt-{path.name}")
        if aside.exists():
            return problem
        os.replace(path, aside)
        return f"{problem} (kept as {aside.name})"

    def publish(self, tmp: Path, name: str, manifest: dict[str, Any]) -> Path:
        """Write ``tmp``'s manifest, rename it to checkpoint ``name``, make that the latest
        and prune older ones."""
        hashed = manifest["format"] != DCP_FORMAT
        files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} if hashed
                 else f.stat().st_size for f in sorted(tmp.iterdir())}
        atomic_write_text(tmp / MANIFEST, json.dumps({**manifest, "files": files}, indent=1))
        final = self.folder / name
        if final.exists():  # left by a run that was restarted from an earlier step
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self._pointer, name)  # also fsyncs the folder: the rename is durable
        self._prune(keep=name)
        return final

    def _prune(self, keep: str) -> None:
        steps = sorted(p for p in self.folder.iterdir() if p.name.startswith("step-"))
        for old in steps[:-KEEP_CHECKPOINTS]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in self.folder.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


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
