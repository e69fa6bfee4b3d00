"""Clear errors for faults while writing: ``writing(path)`` turns an OSError (a full disk,
an unwritable path) into one line naming the file and what to do, and removes the partial
file; ``check_can_create`` refuses an output path before any work; ``command_failed`` is
every CLI's last word on an error (one ``error:`` line, exit status 2).

Imports only the error family, so the lowest writers (gpd_train.train.checkpoint) can use it.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from gpd_train.errors import ConfigError, GPDError

# -- writing --------------------------------------------------------------------------------
AGAIN = "run the command again"
# What a command turns into its one error line (``command_failed``); anything else is a bug
# and keeps its traceback.
COMMAND_ERRORS = (GPDError, OSError, SafetensorError)


class WriteError(GPDError, OSError):
    """An output that could not be written: the message names the file and the remedy,
    then the command's next step (``then``; a caller that knows better replaces it)."""

    def __init__(self, code: int, message: str, then: str = AGAIN) -> None:
        super().__init__(code, message)
        self.message = message
        self.then = then

    def __str__(self) -> str:
        return f"{self.message}, then {self.then}"

    def followed_by(self, then: str, prefix: str = "") -> WriteError:
        """The same error with another next step (and ``prefix`` before it, e.g. a stage)."""
        return WriteError(self.errno or errno.EIO, prefix + self.message, then)


def check_can_create(where: str, path: str | Path) -> None:
    """Refuse an output path no file can be created under (e.g. under /proc, or a read-only
    mount that os.access does not see): a temporary file is made and removed where the
    first missing folder would go, so nothing stays behind."""
    path = Path(path)
    existing = _existing(path)
    if not existing.is_dir():
        return  # a file in the way: check_writable_folder names it
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"{where} {path} cannot be written (no file can be created in "
                         f"{existing}: {exc.strerror or exc}); choose another path") from None


def command_failed(exc: GPDError | OSError | SafetensorError, out: str | Path | None = None) -> int:
    """Print a command's error as one ``error:`` line on stderr; returns the exit status, 2.
    An OSError of a command writing the folder ``out`` is said about that folder or the file
    it names (``output_error``); without ``out`` it is printed as the OS says it."""
    if out is not None and not isinstance(exc, GPDError):
        exc = output_error(out, exc)
    print(f"error: {exc}", file=sys.stderr)
    return 2


def output_error(out: str | Path, exc: OSError | SafetensorError) -> WriteError:
    """A command's OSError as one line: about its output folder ``out`` unless the error
    names a file outside it (then about that file)."""
    if isinstance(exc, WriteError):
        return exc
    out = Path(out)
    filename = getattr(exc, "filename", None)
    if filename and not Path(filename).resolve().is_relative_to(out.resolve()):
        return WriteError(exc.errno or errno.EIO, f"cannot access {filename}: "
                                                  f"{exc.strerror or exc}; make it accessible")
    return _write_error(out, exc)


def copy_error(exc: shutil.Error) -> WriteError:
    """``shutil.copytree``'s error (a list of (source, target, reason), one per file that
    failed) as one line about the first file: a full disk is said as such."""
    failures = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    if not failures:
        return WriteError(errno.EIO, f"cannot copy: {exc}; check the source and the target")
    source, target, why = failures[0]
    found = re.search(r"\[Errno (\d+)\]", str(why))
    code = int(found.group(1)) if found else errno.EIO
    if code in (errno.ENOSPC, errno.EDQUOT):
        return _write_error(Path(target), OSError(code, str(why)))
    more = f" (and {len(failures) - 1} more file(s))" if len(failures) > 1 else ""
    return WriteError(code, f"cannot copy {source} to {target}{more}: {why}; make the source "
                            "readable and the target's folder writable")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def writing(path: str | Path, partial: Path | None = None) -> Iterator[None]:
    """Turn an OSError inside the block into a ``WriteError`` naming ``path``; ``partial``
    (a temporary file the block writes) is removed, so a failed write leaves nothing."""
    path = Path(path)
    try:
        yield
    except WriteError:
        raise
    except (OSError, SafetensorError) as exc:
        if partial is not None:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
        raise _write_error(path, exc) from None


def _write_error(path: Path, exc: OSError | SafetensorError) -> WriteError:
    # safetensors reports I/O failures as SafetensorError("... (os error N)").
    found = re.search(r"os error (\d+)", str(exc))
    code = getattr(exc, "errno", None) or (int(found.group(1)) if found else errno.EIO)
    if code in (errno.ENOSPC, errno.EDQUOT):
        where = _existing(path)
        free = shutil.disk_usage(where).free
        return WriteError(code, f"no space left while writing {path} ({free / 2**20:.0f} MiB "
                                f"free on the disk holding {where}): free space there (e.g. "
                                "folders moved aside as *.old-<time>/, or ckpt/ of finished "
                                "stages) or write elsewhere")
    filename = getattr(exc, "filename", None)
    failed = f" ({filename})" if filename and str(filename) != str(path) else ""
    reason = getattr(exc, "strerror", None) or str(exc)
    return WriteError(code, f"cannot write {path}{failed}: {reason}; choose a path in a "
                            "writable folder (or make this one writable)")
