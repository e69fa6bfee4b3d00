"""The `gpd` op namespace: one schema definition, shared by the native and Python backends.

We use `torch.library.Library.define` + `impl` rather than `torch.library.triton_op`:
`triton_op` would define each op itself from Python type hints, but these schemas
belong to `schemas.txt`, which the native C++ library compiles in and defines when it
is loaded first. A second definition would fail, and a hint-derived schema could drift
from the C++ one. So the definition happens exactly once (here or in C++), and this
side only attaches kernels (CUDA/Triton, and CPU when native is absent), fake kernels
and autograd to whatever definition exists.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._native import load_native

NAMESPACE = "gpd"
SCHEMA_FILE = Path(__file__).resolve().parent / "schemas.txt"

_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
NATIVE_CPU = load_native()


def _define_schemas() -> None:
    for line in SCHEMA_FILE.read_text().splitlines():
        if line.strip():
            _LIBRARY.define(line.strip())


if not NATIVE_CPU:
    _define_schemas()


def register_cpu(name: str, cpu_kernel) -> None:
    """Attach the CPU reference, unless native serves CPU."""
    if not NATIVE_CPU:
        _LIBRARY.impl(name, cpu_kernel, "CPU")


def register_kernels(name: str, cpu_kernel, cuda_kernel) -> None:
    """Attach the CPU reference (unless native serves CPU) and the CUDA Triton kernel."""
    register_cpu(name, cpu_kernel)
    _LIBRARY.impl(name, cuda_kernel, "CUDA")
