"""Atomic checkpoints: weights and EMA in safetensors, trainer state beside them.

A checkpoint is a folder ``<stage>/ckpt/step-NNNNNNNN/`` holding ``model.safetensors``,
``ema.safetensors``, ``state.pt`` (optimizer, RNG, step, data-stream state) and
``manifest.json`` (sizes and SHA-256 of the other files). It is written under a temporary
name and renamed into place; only then does the ``latest`` pointer (itself replaced
atomically) move to it. A crash at any moment therefore leaves the previous checkpoint
as the one that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# One error for every checkpoint problem, model files and trainer checkpoints alike.
from gpd_model import CheckpointError, add_guidance_input

KEEP_CHECKPOINTS = 2


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
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save tensors as safetensors at ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata=metadata)
    with tmp.open("rb") as handle:
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


def load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
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


def load_exact_state(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     source: Path) -> None:
    """Copy ``state`` into ``target``'s tensors, all or nothing: keys/shapes/dtypes must match."""
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} {state[k].dtype}, model "
        f"{tuple(target[k].shape)} {target[k].dtype}"
        for k in sorted(set(target) & set(state))
        if state[k].shape != target[k].shape or state[k].dtype != target[k].dtype
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"checkpoint {source} does not match the model; nothing was loaded.\n"
            f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n"
            f"  mismatched: {mismatched}"
        )
    with torch.no_grad():
        for key, value in target.items():
            value.copy_(state[key])


def check_run_metadata(source: Path, saved: dict[str, str], expected: dict[str, str]) -> None:
    """Refuse a checkpoint written for another stage, model shape or stage teacher."""
    for key in ("stage", "dit_config", "teacher_sha256"):
        if key == "teacher_sha256" and (key not in saved or key not in expected):
            continue  # a checkpoint from before teachers were recorded
        if saved.get(key) != expected.get(key):
            raise CheckpointError(
                f"checkpoint {source} was written for {key}={saved.get(key)!r}, this run has "
                f"{expected.get(key)!r}; start the stage over with --restart (moves it aside)")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointStore:
    """The rolling checkpoints of one training stage, in ``folder``."""

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

    def load_newest_valid(self) -> tuple[Path, list[str], tuple[
            int, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any],
            dict[str, str]]]:
        """(path, problems, loaded) of the newest checkpoint that verifies.

        ``problems`` says why the ``latest`` pointer and any newer checkpoint were passed
        over; those checkpoints are renamed ``corrupt-step-*`` (kept, never pruned) so that
        a resumed run's next save cannot overwrite them.
        """
        problems = []
        try:
            if self.latest() is None:
                problems.append(f"{self._pointer} is missing")
        except (CheckpointError, OSError, UnicodeDecodeError) as exc:
            problems.append(str(exc))
        for path in self.candidates():
            try:
                return path, problems, self.load(path)
            except CheckpointError as exc:
                problems.append(str(exc))
                aside = path.with_name(f"corrupt-{path.name}")
                if not aside.exists():
                    os.replace(path, aside)
                    problems[-1] += f" (kept as {aside.name})"
        raise CheckpointError(f"no checkpoint in {self.folder} verifies:\n  "
                              + "\n  ".join(problems)
                              + "\nstart the stage over with --restart (moves it aside)")

    def save(self, step: int, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
             state: dict[str, Any], metadata: dict[str, str]) -> Path:
        """Write checkpoint ``step`` and make it the latest; prune older ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        tmp = self.folder / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        meta = {**metadata, "step": str(step)}
        save_weights(tmp / "model.safetensors", model, meta)
        save_weights(tmp / "ema.safetensors", ema, meta)
        torch.save(state, tmp / "state.pt")
        files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                 for f in sorted(tmp.iterdir())}
        atomic_write_text(tmp / "manifest.json",
                          json.dumps({"step": step, "files": files}, indent=1))
        final = self.folder / name
        if final.exists():  # left by a run that was restarted from an earlier step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        atomic_write_text(self._pointer, name)
        self._prune(keep=name)
        return final

    def _prune(self, keep: str) -> None:
        steps = sorted(p for p in self.folder.iterdir() if p.name.startswith("step-"))
        for old in steps[:-KEEP_CHECKPOINTS]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in self.folder.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, path: Path | None = None
             ) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any],
                        dict[str, str]]:
        """(step, model, ema, state, metadata) of the latest (or given) checkpoint, verified."""
        path = path or self.latest()
        if path is None:
            raise CheckpointError(f"no checkpoint in {self.folder}")
        manifest_path = path / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            step = int(manifest["step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"corrupt checkpoint manifest {manifest_path}: {exc}") from None
        expected = {"model.safetensors", "ema.safetensors", "state.pt"}
        if set(files) != expected:
            raise CheckpointError(f"{manifest_path} lists {sorted(files)}, expected "
                                  f"{sorted(expected)}")
        for name, info in files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path} is missing {name}")
            if file.stat().st_size != info["bytes"] or sha256_file(file) != info["sha256"]:
                raise CheckpointError(f"checkpoint file {file} is corrupt (size or SHA-256 "
                                      "differs from the manifest)")
        model = load_weights(path / "model.safetensors")
        ema = load_weights(path / "ema.safetensors")
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a bad pickle
            raise CheckpointError(f"corrupt trainer state {path / 'state.pt'}: {exc}") from None
        return step, model, ema, state, read_metadata(path / "model.safetensors")
