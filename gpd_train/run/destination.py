"""Where a command may write: its own kind of output, or a new or empty folder; never the user's.

Each writing command marks its folder with ``.gpd_output.json`` (``{"writer": KIND}``):

- ``run``: the trainer's run folder (``--run-dir``), which accumulates stages over many
  invocations; stages are replaced only by ``--restart`` (moved aside, see run_folder).
- ``export``, ``samples``: the export's and the sampler's ``--out``, written whole into a
  temporary sibling and renamed into place (a failure leaves nothing half-written); their
  own earlier output is replaced only with ``--overwrite``, which moves it aside to
  ``<name>.old-<time>/``.
- ``eval``: ``<run>/eval``, rewritten in place while its inputs (stage hashes, compared
  runs, evaluation settings) are unchanged, moved aside first when they changed.
- ``data``: gpd_train.encode_prompts' ``--out``, a prompt-embedding data set written shard by
  shard and resumed in place (like the run folder, its own earlier output is always reused).

A destination that exists, is not empty and is not the command's own kind is refused,
saying what it is (a Diffusers pipeline, a model folder, another command's output) and what
to pass instead. So is a destination inside another command's output, or inside what a run
folder writes itself (its stages, ``eval/``, ``config.json``; its ``prompt-embeddings/`` is
a data set, marked as one); the rest of a run folder is the user's (e.g. ``<run>/samples``).
Paths are taken absolute, so ``.`` is the current directory; the export and the sampler,
which rename their finished output into place, refuse the current directory and its parents.
Nothing here deletes anything but its own unfinished temporary folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpd_train.config.chains import CHAINS
from gpd_train.errors import GPDError
from gpd_train.run.files import atomic_write_text
from gpd_train.run.records import LOCK_NAME, RECORD, check_writable_folder, move_aside
from gpd_train.run.writes import WriteError, check_can_create, writing

MARKER = ".gpd_output.json"
RUN, EXPORT, SAMPLES, EVAL, DATA = "run", "export", "samples", "eval", "data"
# kind -> (what its folder is, the command that writes it)
KINDS: dict[str, tuple[str, str]] = {
    RUN: ("a gpd_train run folder", "python -m gpd_train"),
    EXPORT: ("an export of gpd_train.export", "python -m gpd_train.export"),
    SAMPLES: ("samples of gpd_train.sample", "python -m gpd_train.sample"),
    EVAL: ("a run's evaluation report (python -m gpd_train --eval)", "python -m gpd_train"),
    DATA: ("a prompt-embedding data set of gpd_train.encode_prompts",
           "python -m gpd_train.encode_prompts"),
}
# Kinds written in place and resumed (their own earlier output is always reused); the others
# are written whole into a temporary sibling and renamed into place (staged_output).
IN_PLACE = frozenset({RUN, DATA})
# Entries a run folder may hold before its config.json and marker (written together once a
# stage's options were accepted): the lock, and the prompts encoded by --prompts.
RUN_IGNORABLE = frozenset({".lock", "prompt-embeddings"})
# What a run folder writes at its top level besides its chains' folders (each also as
# <name>.old-<time> once moved aside): nothing may be written inside these but by the run.
# (Its prompt-embeddings/ is a data set, marked as one: encode_prompts may resume it.)
RUN_OWNED = frozenset({"config.json", "eval", MARKER, LOCK_NAME})
DATA_FILES = ("shard-00000.safetensors", "negative.safetensors")


class DestinationError(GPDError, ValueError):
    """An output path that would overwrite something the command did not write."""


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's ``.gpd_output.json`` (None when absent or unreadable: not ours)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(folder: Path, kind: str, **extra: Any) -> None:
    atomic_write_text(Path(folder) / MARKER, json.dumps(
        {"writer": kind, "command": KINDS[kind][1], **extra}, indent=1, sort_keys=True) + "\n")


def _is_legacy_run(folder: Path) -> bool:
    """A run folder without the marker (written before markers existed, or through the
    Python API): config.json is a gpd_train run config, or stage 0 holds a stage record or
    checkpoints."""
    if (folder / "stage0" / RECORD).is_file() or (folder / "stage0" / "ckpt").is_dir():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "steps" in config and "run_dir" in config


def _is_legacy_data(folder: Path) -> bool:
    """A data set encoded before markers existed: its first shard or negative prompt."""
    return any((folder / name).is_file() for name in DATA_FILES)


def _writer(folder: Path) -> str | None:
    """The kind of gpd_train output ``folder`` is (None: not one)."""
    marker = read_marker(folder)
    if marker is not None and marker.get("writer") in KINDS:
        return marker["writer"]
    if _is_legacy_run(folder):
        return RUN
    return DATA if _is_legacy_data(folder) else None


def _is_stage_name(name: str) -> bool:
    return name == "guidance" or re.fullmatch(r"stage\d+", name) is not None


def _run_owned(run: Path, name: str) -> bool:
    """Whether the run folder's top-level entry ``name`` is one the run writes itself: a
    stage, a chain's folder (registered, or holding stage folders), eval/, its data, ..."""
    name = re.sub(r"\.old-[0-9-]+$", "", name)
    chains = {chain.folder for chain in CHAINS.values() if chain.folder}
    if name in RUN_OWNED or name in chains or _is_stage_name(name):
        return True
    folder = run / name
    return folder.is_dir() and any(_is_stage_name(entry.name) for entry in folder.iterdir())


def describe(folder: Path) -> str:
    """What a folder that is not the caller's output is, in words a user recognises."""
    writer = _writer(folder)
    if writer is not None:
        return KINDS[writer][0]
    if (folder / "model_index.json").is_file():
        return "a Diffusers pipeline folder (it holds model_index.json)"
    if (folder / "transformer").is_dir():
        return "a Diffusers pipeline folder (it holds transformer/)"
    config = folder / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            name = None
        return (f"a Diffusers model folder ({name} config.json)" if name else
                "a folder whose config.json was not written by gpd_train")
    names = sorted(entry.name for entry in folder.iterdir())
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"a folder holding {len(names)} entries not written by gpd_train ({shown})"


def _entries(folder: Path, ignorable: frozenset[str] = frozenset()) -> list[str]:
    return [entry.name for entry in folder.iterdir() if entry.name not in ignorable]


def check_given(flag: str, path: str | Path) -> None:
    """Refuse an empty path: it would silently mean the current directory."""
    if not str(path).strip():
        raise DestinationError(f"{flag} is empty: give a folder path (an empty path would "
                               "write into the current directory)")


def absolute(path: str | Path) -> Path:
    """``path`` made absolute without resolving links (``.`` is the current directory)."""
    return Path(os.path.abspath(path))


def check_destination(flag: str, path: str | Path, kind: str, overwrite: bool = False) -> None:
    """Refuse ``path`` unless it is new, empty, or ``kind``'s own earlier output (an in-place
    kind's is always reused; another kind's needs ``overwrite``), and not inside another
    output (see the module's docstring)."""
    check_given(flag, path)
    try:
        check_writable_folder(flag, path)
    except ValueError as exc:
        raise DestinationError(str(exc)) from None
    if kind not in IN_PLACE:
        _check_not_current(flag, path, kind)
    _check_ancestors(flag, path)
    _check_kind(flag, absolute(path), kind, overwrite)
    try:  # probed only once the folder is known to be this command's to write
        check_can_create(flag, path)
    except ValueError as exc:
        raise DestinationError(str(exc)) from None


def _check_not_current(flag: str, path: str | Path, kind: str) -> None:
    """A staged output is renamed into place: never onto the current directory (or a
    folder holding it), which the user's shell is in."""
    here = Path.cwd()
    target = absolute(path)
    if target == here or target in here.parents:
        where = "is the current directory" if target == here else "holds the current directory"
        raise DestinationError(
            f"{flag} {path} {where}: {KINDS[kind][1]} writes its output as a new folder "
            f"renamed into place; give a folder name, e.g. {flag} ./{kind}")


def _check_ancestors(flag: str, path: str | Path) -> None:
    """Refuse a path inside another gpd_train output, or inside what a run writes itself."""
    target = absolute(path).resolve()  # through links: where the files would really go
    for folder in target.parents:
        writer = _writer(folder)
        if writer is None:
            continue
        inside = folder / target.relative_to(folder).parts[0]
        if writer == RUN and not _run_owned(folder, inside.name):
            continue  # the rest of a run folder is the user's, e.g. <run>/samples
        if inside == target and _writer(target) is not None:
            continue  # a marked output itself, e.g. <run>/eval: _check_kind says what it is
        if writer != RUN:
            where = f"inside {folder}, {KINDS[writer][0]}"
        elif inside == target:
            where = f"a folder the gpd_train run folder {folder} writes itself"
        else:
            where = f"inside {inside}, which the gpd_train run folder {folder} writes itself"
        raise DestinationError(
            f"{flag} {path} is {where}: nothing but its own command writes there; choose an "
            f"{flag} outside it, e.g. a new folder beside {folder}")


def _check_kind(flag: str, folder: Path, kind: str, overwrite: bool) -> None:
    """Refuse an existing, non-empty ``folder`` that is not ``kind``'s own output."""
    what, command = KINDS[kind]
    if not folder.exists():
        return
    if not _entries(folder, RUN_IGNORABLE if kind == RUN else frozenset()):
        return
    ours = _writer(folder) == kind
    if ours and (kind in IN_PLACE or overwrite):
        return
    if ours:
        raise DestinationError(
            f"{flag} {folder} already holds {what}; pass --overwrite to move it aside to "
            f"{folder.name}.old-<time>/ and write a new one, or choose another {flag}")
    refill = " (--overwrite replaces only the command's own earlier output)" if overwrite else ""
    raise DestinationError(
        f"{flag} {folder} is {describe(folder)}, not {what}: {command} writes only into a "
        f"new or empty folder or its own earlier output{refill}; choose another {flag}, "
        "e.g. a new folder")


def check_export_destination(out: str | Path, base: str | Path | None,
                             overwrite: bool = False) -> None:
    """The export's ``--out``: apart from ``--base`` (never equal, inside or around it),
    then the rule for every output."""
    check_given("--out", out)
    if base is not None:
        target, source = Path(out).resolve(), Path(base).resolve()
        relation = ("is" if target == source else "is inside" if source in target.parents
                    else "contains" if target in source.parents else None)
        if relation is not None:
            raise DestinationError(
                f"--out {out} {relation} --base {base}: the export writes transformer/, "
                "scheduler/ and model_index.json and links the base's text_encoder/, "
                "tokenizer/ and vae/, which would replace the base's own; choose an --out "
                "outside the base folder, e.g. a new folder beside it")
    check_destination("--out", out, EXPORT, overwrite)


@contextlib.contextmanager
def staged_output(path: str | Path, kind: str, *, flag: str = "--out",
                  overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; on success mark it as ``kind``
    and rename it into place (an earlier output of ours is moved aside first, with
    ``overwrite``); on failure remove the temporary folder, leaving ``path`` untouched."""
    check_destination(flag, path, kind, overwrite)
    path = absolute(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}-{time.monotonic_ns()}")
    staging.mkdir()
    try:
        yield staging
        write_marker(staging, kind)
        check_destination(flag, path, kind, overwrite)  # it may have changed while we wrote
        if path.exists() and _entries(path):
            moved = move_aside(path)
            print(f"{flag}: moved the earlier {KINDS[kind][0]} to {moved}")
        elif path.exists():
            path.rmdir()  # empty: os.replace would take its place anyway on Linux
        os.replace(staging, path)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)  # only ever our own unfinished output
        if isinstance(exc, WriteError):  # named where the file was going, not the temporary
            raise WriteError(exc.errno or errno.EIO,
                             exc.message.replace(str(staging), str(path)), exc.then) from None
        raise


def claim(folder: str | Path, kind: str = RUN) -> None:
    """Mark an in-place output as ``kind``'s (the run folder with its first config.json, a
    data set with its first shard; kept after that)."""
    if read_marker(Path(folder)) is None:
        write_marker(Path(folder), kind)


def reuse_or_move_aside(folder: str | Path, kind: str, inputs: dict[str, Any]) -> Path | None:
    """Prepare ``folder`` for an in-place rewrite: kept when it was written from the same
    ``inputs``, else (other inputs, or not marked) replaced by a new folder holding only its
    marker, the old one moved aside; returns where it went. The new marker is written first,
    so a write that fails (a full disk) moves nothing and leaves nothing behind."""
    folder = Path(folder)
    inputs = json.loads(json.dumps(inputs, sort_keys=True))  # as it reads back from JSON
    marker = read_marker(folder)
    if marker is not None and marker.get("writer") == kind and marker.get("inputs") == inputs:
        return None
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}-{time.monotonic_ns()}")
    moved = None
    try:
        with writing(staging):
            staging.mkdir(parents=True)
        write_marker(staging, kind, inputs=inputs)
        if folder.exists() and _entries(folder):
            moved = move_aside(folder)
        elif folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only ever our own unfinished folder
        raise
    return moved
