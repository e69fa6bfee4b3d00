"""Loader for the optional native CPU op library (built by CMakeLists.txt).

The native library, when present, owns the `gpd::` schemas (it defines them from
`schemas.txt`, compiled in) and registers CPU kernels for them. Without it, the
Python side defines the same schemas from the same file and registers the PyTorch
references as the CPU kernels. Either way each schema has exactly one definition.
Set GPD_DISABLE_NATIVE=1 to force the Python reference backend.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

_LOG = logging.getLogger("gpd_kernels")
_PACKAGE_DIR = Path(__file__).resolve().parent
_LIB_DIR = _PACKAGE_DIR / "_lib"
_SCHEMA_FILE = _PACKAGE_DIR / "schemas.txt"
_REBUILD = "rebuild with `pip install --no-build-isolation -e .` or set GPD_DISABLE_NATIVE=1"
_LIB_NAME = {"darwin": "libgpd_native.dylib", "win32": "gpd_native.dll"}.get(
    sys.platform, "libgpd_native.so"
)

_state: dict[str, object] = {"loaded": None, "error": None}
DISABLE_VAR = "GPD_DISABLE_NATIVE"
DISABLE_VALUES = ("", "0", "1")  # unset/empty or 0: native when built; 1: the references


def disable_native_error() -> str | None:
    """Why GPD_DISABLE_NATIVE holds a value it does not understand (None: it is fine)."""
    value = os.environ.get(DISABLE_VAR, "")
    if value.strip() in DISABLE_VALUES:
        return None
    return (f"{DISABLE_VAR}={value!r}: expected 1 (use the Python reference CPU ops) or 0 / "
            "unset (the native library when built)")


def native_library_path() -> Path:
    """Where the built native library is expected."""
    return _LIB_DIR / _LIB_NAME


def schema_mismatches() -> list[str]:
    """Ops whose registered `gpd::` schema differs from schemas.txt (empty when they agree)."""
    mismatches = []
    for line in _SCHEMA_FILE.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        name = line.split("(", 1)[0]
        packet = getattr(torch.ops.gpd, name, None)
        registered = str(packet.default._schema) if packet is not None else "nothing"
        if registered != f"gpd::{line}":
            mismatches.append(f"gpd::{name}: schemas.txt says {line!r}, registered {registered!r}")
    return mismatches


def load_native() -> bool:
    """Load the native library once; return True if its CPU kernels are active."""
    if _state["loaded"] is not None:
        return bool(_state["loaded"])
    path = native_library_path()
    loaded = False
    if os.environ.get(DISABLE_VAR, "").strip() == "1":
        _state["error"] = f"disabled by {DISABLE_VAR}=1"
    elif not path.exists():
        _state["error"] = f"{path} not built (pip install --no-build-isolation -e . builds it)"
    else:
        try:
            torch.ops.load_library(str(path))
            loaded = True
        except OSError as exc:  # a stale build against another torch, typically
            _state["error"] = f"failed to load {path}: {exc}"
        if loaded and (mismatches := schema_mismatches()):
            # The stale schemas are registered now and cannot be unloaded: stop here.
            raise RuntimeError(f"{path} was built from another schemas.txt ({_REBUILD}): "
                               + "; ".join(mismatches))
    _state["loaded"] = loaded
    backend = "native" if loaded else "reference"
    _LOG.info("gpd_kernels CPU backend: %s%s", backend,
              "" if loaded else f" ({_state['error']})")
    return loaded


def cpu_backend() -> str:
    """'native' when the C++ library serves the CPU ops, else 'reference'."""
    return "native" if load_native() else "reference"


def native_unavailable_reason() -> str | None:
    """Why the native backend is not active, or None when it is."""
    load_native()
    return None if _state["loaded"] else str(_state["error"])
