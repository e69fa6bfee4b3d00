"""Which implementation a model calls for each fused DiT op, and when.

`fused_dit_ops(x)`: whether a model should route activations x through the fused ops:
CUDA tensors (float64 excepted: exact checks stay on the eager code), or CPU tensors
inside `force_fused_dit_ops()`, which needs TRITON_INTERPRET=1. The tests use it to run
the model's fused path on the CPU with the Triton kernels interpreted, so a change that
breaks only that path fails CI instead of the next GPU run.

`dit_op(name)`: the callable for one op: "triton" (its Triton autograd Function) or
"compile" (`torch.compile` of its PyTorch reference). No op should keep a hand-written
kernel only because it is hand-written, so the choice is per op. Every op defaults to
"triton" until a GPU run measures them side by side inside the training step (timed alone
on an H200, gated_residual and rms_norm_rope were faster compiled, the latter before its
kernels loaded whole tiles). `benchmarks/dit_op_backends.py` (a block of
`benchmarks/device_check.sh`) times the model's training step with each op switched alone
and prints the faster backend per op as a value for the variable below. Choose with
`set_dit_op_backend(name, backend)` or the environment, read at import:
`GPD_DIT_OP_BACKENDS="gated_residual=compile,rms_norm_rope=compile"`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from ._launch import interpreting
from .adaln import (
    gated_residual,
    gated_residual_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)
from .rope_norm import rms_norm_rope, rms_norm_rope_reference

__all__ = [
    "BACKENDS",
    "DIT_OPS",
    "dit_op",
    "dit_op_backend",
    "environment_backends",
    "environment_value",
    "force_fused_dit_ops",
    "fused_dit_ops",
    "set_dit_op_backend",
]

ENV_VAR = "GPD_DIT_OP_BACKENDS"
BACKENDS = ("triton", "compile")
# name -> (fused op, its PyTorch reference): same signature, same outputs.
DIT_OPS: dict[str, tuple[Callable, Callable]] = {
    "layernorm_modulate": (layernorm_modulate, layernorm_modulate_reference),
    "gated_residual": (gated_residual, gated_residual_reference),
    "rms_norm_rope": (rms_norm_rope, rms_norm_rope_reference),
}

_forced: ContextVar[bool] = ContextVar("gpd_force_fused_dit_ops", default=False)


def _check_choice(name: str, backend: str) -> None:
    if name not in DIT_OPS:
        raise ValueError(f"DiT op: expected one of {tuple(DIT_OPS)}, got {name!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{name}: expected a backend in {BACKENDS}, got {backend!r}")


def _from_environment(value: str) -> dict[str, str]:
    chosen = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, backend = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV_VAR}: expected name=backend items, got {item!r}")
        _check_choice(name.strip(), backend.strip())
        chosen[name.strip()] = backend.strip()
    return chosen


def environment_value(backends: dict[str, str]) -> str:
    """The value of GPD_DIT_OP_BACKENDS that selects `backends` (op name -> backend)."""
    for name, backend in backends.items():
        _check_choice(name, backend)
    return ",".join(f"{name}={backend}" for name, backend in backends.items())


def environment_backends() -> dict[str, str]:
    """The backends GPD_DIT_OP_BACKENDS selects (ValueError naming the variable when bad).

    Command lines call it before any work, so a bad value is one clear line, not a
    traceback from the first fused op (on the CPU, where no fused op runs, never).
    """
    return _from_environment(os.environ.get(ENV_VAR, ""))


# Filled from the environment at the first use, not at import: a bad value must not break
# importing (and with it every `--help`).
_backends: dict[str, str] = {}


def _current() -> dict[str, str]:
    if not _backends:
        _backends.update(dict.fromkeys(DIT_OPS, "triton") | environment_backends())
    return _backends


def set_dit_op_backend(name: str, backend: str) -> None:
    """Serve DiT op `name` by "triton" or "compile" from now on (process-wide)."""
    _check_choice(name, backend)
    _current()[name] = backend


def dit_op_backend(name: str) -> str:
    """The backend that `dit_op(name)` currently returns."""
    _check_choice(name, "triton")
    return _current()[name]


@functools.cache
def _compiled(name: str) -> Callable:
    return torch.compile(DIT_OPS[name][1])


def dit_op(name: str) -> Callable:
    """The implementation of DiT op `name` that a model should call (see module docstring)."""
    if dit_op_backend(name) == "compile":
        return _compiled(name)
    return DIT_OPS[name][0]


def fused_dit_ops(x: torch.Tensor) -> bool:
    """Whether a model should call the fused DiT ops for activations x."""
    if x.dtype == torch.float64:
        return False
    return x.is_cuda or _forced.get()


@contextmanager
def force_fused_dit_ops() -> Iterator[None]:
    """Within the block, `fused_dit_ops` says yes for CPU tensors too (Triton interpreted).

    Raises RuntimeError unless TRITON_INTERPRET=1 (set before triton is first imported):
    without the interpreter the CPU has no Triton backend, and the block would silently
    run the references.
    """
    if not interpreting():
        raise RuntimeError("force_fused_dit_ops: expected TRITON_INTERPRET=1 (the Triton "
                           "interpreter runs the kernels on CPU tensors), got "
                           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}")
    token = _forced.set(True)
    try:
        yield
    finally:
        _forced.reset(token)
