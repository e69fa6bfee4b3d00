"""One attention entry point with an observable, forceable backend choice."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F

try:  # optional dependency: only present on CUDA machines that built it
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

BACKENDS = ("flash_attn", "sdpa", "math")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)

_log = logging.getLogger(__name__)
_forced_backend: str | None = None
_announced: set[str] = set()


def flash_attn_available() -> bool:
    """Whether the flash_attn package could be imported."""
    return _flash_attn_func is not None


def attention_backend(q: torch.Tensor) -> str:
    """Name of the backend :func:`attention` uses for a query like ``q``."""
    if _forced_backend is not None:
        return _forced_backend
    if _flash_attn_func is not None and q.is_cuda and q.dtype in _FLASH_DTYPES:
        return "flash_attn"
    return "sdpa"


@contextlib.contextmanager
def force_attention_backend(name: str) -> Iterator[None]:
    """Make :func:`attention` use backend ``name`` inside the ``with`` block."""
    global _forced_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    if name == "flash_attn" and _flash_attn_func is None:
        raise RuntimeError("attention backend 'flash_attn' forced but flash_attn is not installed")
    previous = _forced_backend
    _forced_backend = name
    try:
        yield
    finally:
        _forced_backend = previous


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for label, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"attention: {label} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.ndim != 4:
            raise ValueError(
                f"attention: {label} must be [batch, length, heads, head_dim], "
                f"got shape {tuple(tensor.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(
            "attention: q and k must agree in batch, heads and head_dim, got "
            f"q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: devices differ: q {q.device}, k {k.device}, v {v.device}")


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Explicit softmax in at least float32: a slow but transparent reference path.
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) * q.shape[-1] ** -0.5
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.to(compute))
    return out.to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention without mask; q/k/v and the result are [B, L, heads, head_dim]."""
    _check_qkv(q, k, v)
    backend = attention_backend(q)
    if backend not in _announced:
        _announced.add(backend)
        _log.info("gpd_model attention backend: %s", backend)
    if backend == "flash_attn":
        if not (q.is_cuda and q.dtype in _FLASH_DTYPES):
            raise ValueError(
                "attention backend 'flash_attn' needs CUDA float16/bfloat16 tensors, "
                f"got {q.dtype} on {q.device}"
            )
        return _flash_attn_func(q, k, v)
    if backend == "math":
        return _math_attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
