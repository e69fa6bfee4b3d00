"""Files of a run folder written and read safely: atomic text, safetensors weights with sorted
metadata, SHA-256, exact loads that list missing and unexpected keys."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpd_model import CheckpointError, add_guidance_input
from gpd_train.run.writes import writing

Signature = dict[str, tuple[tuple[int, ...], torch.dtype]]


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


def signature_differences(expected: Mapping[str, tuple], stored: Mapping[str, tuple]
                          ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched) keys of ``stored`` against ``expected``, sorted;
    mismatched: in both, with another tuple (shape, dtype or whatever each key holds)."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(stored) if stored[k] != expected[k])
    return missing, unexpected, mismatched


def signature_mismatch(expected: Mapping[str, tuple], stored: Mapping[str, tuple]) -> str | None:
    """The keys, and the shapes and dtypes (or whatever each key's tuple holds) by which
    ``stored`` differs from ``expected``, or None."""
    missing, unexpected, differing = signature_differences(expected, stored)
    if not (missing or unexpected or differing):
        return None
    mismatched = [f"{k}: checkpoint {' '.join(map(str, stored[k]))}, model "
                  f"{' '.join(map(str, expected[k]))}" for k in differing]
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
