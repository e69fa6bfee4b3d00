"""The run folder as a record: one trainer at a time, stage records, nothing deleted.

- ``<run>/.lock``: an advisory ``fcntl`` lock held by the one trainer writing the folder;
  a second one is refused with the holder's PID (the kernel drops the lock when the
  holder dies, so a killed run never leaves a stale lock behind).
- ``<stage>/done.json``: the stage record. Besides the training summary it holds the
  SHA-256 of the stage output (``sha256``), the stage teacher it was distilled from
  (``teacher``, ``teacher_sha256``) and the options that shaped it (``options``: shift,
  steps, guidance, ...). Loading an output checks its hash; a stage whose teacher's
  hash is no longer the one recorded is stale.
- Replacing a stage moves its folder aside to ``<stage>.old-<time>/``; nothing is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from gpd_train.errors import ConfigError, GPDError
from gpd_train.run.files import CheckpointError, read_metadata, sha256_file

LOCK_NAME = ".lock"
RECORD = "done.json"
OUTPUT = "model.safetensors"
# The stage output's metadata key holding done.json's "options" (JSON), for verify_output.
OPTIONS_KEY = "options"


class RunFolderError(GPDError, RuntimeError):
    """A user-facing problem with the run folder (printed without a traceback)."""


class RunLockedError(RunFolderError):
    """Another process holds the run folder's lock."""


class StageExistsError(RunFolderError):
    """A stage has checkpoints or an output and neither --resume nor --restart was given."""


class StaleStageError(RunFolderError):
    """A stage was distilled from a teacher that has changed since."""


class RunLock(contextlib.AbstractContextManager):
    """Hold ``<folder>/.lock`` exclusively; refuse with the holder's PID when taken."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # e.g. a folder named .lock, or a read-only file
            raise RunFolderError(
                f"cannot open the run folder's lock file {self.path}: {exc.strerror}; it "
                "must be a file gpd_train can write (it holds the PID of the trainer using "
                "the folder): move what is there elsewhere, or choose another --run-dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"cannot lock {self.path}: {exc}") from None
            raise RunLockedError(
                f"run folder {self.folder} is in use by another gpd_train process (PID "
                f"{holder}, lock {self.path}); wait for it to finish or stop it, or pass "
                "another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            # The file stays: unlinking it would let a waiting process lock a dead inode.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def read_record(folder: Path) -> dict[str, Any]:
    """The stage record ``folder/done.json``; a damaged one is named in the error."""
    path = Path(folder) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"corrupt stage record {path}: {exc}; retrain the stage with "
                             "--restart (its folder is moved aside, not deleted)") from None
    if not isinstance(record, dict):
        raise RunFolderError(f"corrupt stage record {path}: expected a JSON object, got "
                             f"{type(record).__name__}")
    options = record.get("options", {})
    fields = [(name, record[name]) for name in _RECORD_FIELDS if name in record]
    if isinstance(options, dict):
        fields += [(f"options.{name}", options[name]) for name in _RECORD_FIELDS
                   if name in options]
    else:
        fields.append(("options", options))
    problems = []
    for name, value in fields:
        check, expected = _RECORD_FIELDS[name.removeprefix("options.")]
        if not check(value):
            problems.append(f"{name} must be {expected}, got {value!r}")
    if not problems and "teacher_steps" in options and "steps" in options and (
            "horizon" not in options and options["teacher_steps"] % options["steps"]):
        problems.append(f"options.steps must divide options.teacher_steps "
                        f"({options['teacher_steps']}: a student step is a whole number of its "
                        f"teacher's steps), got {options['steps']}")
    if problems:
        raise RunFolderError(f"corrupt stage record {path}: {'; '.join(problems)}; retrain the "
                             "stage with --restart (its folder is moved aside, not deleted)")
    return record


def _positive(value: Any, integer: bool = False) -> bool:
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    return number and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _guidance(value: Any) -> bool:
    if isinstance(value, list):
        return len(value) == 2 and all(map(_positive, value)) and value[0] <= value[1]
    return _positive(value)


def _digest(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) is not None


# done.json fields that the sampler, export and staleness read: (check, what is expected).
# Each may sit at the top of the record or in its "options" (not every field in each).
_RECORD_FIELDS = {
    "options": (lambda value: isinstance(value, dict), "a JSON object"),
    "steps": (lambda value: _positive(value, integer=True), "a positive int"),
    "teacher_steps": (lambda value: _positive(value, integer=True), "a positive int"),
    "iterations": (lambda value: _positive(value, integer=True), "a positive int"),
    "shift": (_positive, "a positive finite number"),
    "guidance": (_guidance, "a CFG scale > 0 or [low, high] with 0 < low <= high"),
    "guidance_input": (lambda value: isinstance(value, bool), "true or false"),
    "sha256": (_digest, "a SHA-256 (64 lowercase hex digits)"),
    "teacher_sha256": (_digest, "a SHA-256 (64 lowercase hex digits)"),
    "teacher": (lambda value: isinstance(value, str), "a stage folder name"),
}


def verify_output(folder: Path) -> str:
    """SHA-256 of ``folder/model.safetensors``, refused when it differs from done.json's."""
    path = Path(folder) / OUTPUT
    if not path.is_file():
        raise CheckpointError(f"missing stage output {path}")
    actual = sha256_file(path)
    expected = read_record(folder).get("sha256")
    if expected is None:
        warnings.warn(f"{folder / RECORD} records no SHA-256 (written before provenance was "
                      f"kept): {path} is used unverified", stacklevel=2)
    elif actual != expected:
        raise CheckpointError(
            f"stage output {path} is corrupt: its SHA-256 {actual[:16]}... differs from "
            f"{expected[:16]}... recorded in {folder / RECORD}; retrain the stage with "
            "--restart")
    _check_recorded_options(folder, path)
    return actual


def _check_recorded_options(folder: Path, path: Path) -> None:
    """done.json's options are those the stage output itself records (outputs written before
    it recorded them are not compared)."""
    inside = read_metadata(path).get(OPTIONS_KEY)
    if inside is None:
        return
    recorded, written = read_record(folder).get("options", {}), json.loads(inside)
    changed = [f"{key} {recorded.get(key)!r} (the output says {written.get(key)!r})"
               for key in sorted(set(recorded) | set(written))
               if recorded.get(key) != written.get(key)]
    if changed:
        raise RunFolderError(f"stage record {folder / RECORD} was edited: options "
                             f"{'; '.join(changed)}; restore it, or retrain the stage with "
                             "--restart (its folder is moved aside, not deleted)")


def move_aside(folder: Path) -> Path | None:
    """Rename ``folder`` to ``<name>.old-<time>`` beside it (None when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.old-{stamp}")
    count = 1
    while target.exists():
        count += 1
        target = folder.with_name(f"{folder.name}.old-{stamp}-{count}")
    os.replace(folder, target)
    return target


def check_writable_folder(where: str, folder: str | Path) -> None:
    """A folder that exists as a writable directory, or can be created."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where} {path} is a file, expected a folder (or a path to create)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} {path} cannot be written ({existing} is not a writable "
                         "folder); choose another path")


def check_run_paths(config: Any) -> None:
    """The run folder can be written and every input path exists, before any work starts."""
    check_writable_folder("--run-dir", config.run_dir)
    inputs = (("--teacher", config.teacher, "Wan2.1 weights: a Wan2.1-T2V-Diffusers folder, its "
               "transformer/ or a .safetensors file"),
              ("--data", config.data, "a prompt-embedding data set folder"),
              ("--prompts", config.prompts, "a text file, one prompt per line"))
    for flag, value, expected in inputs:
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{flag} {value} does not exist (expected {expected})")
