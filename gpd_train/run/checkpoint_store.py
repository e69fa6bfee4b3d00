"""A stage's checkpoint folder on disk: a manifest per checkpoint, the newest that verifies, a
latest pointer, older ones pruned."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from gpd_model import CheckpointError
from gpd_train.run.files import atomic_write_text, sha256_file

KEEP_CHECKPOINTS = 2
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
SINGLE_FORMAT, DCP_FORMAT = "safetensors", "dcp"
_DCP_METADATA = ".metadata"


class CorruptStateError(CheckpointError):
    """A checkpoint's trainer state (state.pt) cannot be read, though its files verify."""


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
