"""Precision on a device: the autocast every sampler, objective and evaluation runs under."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; a no-op otherwise."""
    if precision == "bf16" and device.type == "cuda":
        # No cast cache while a CUDA graph is captured (torch.cuda.graph's advice for autocast).
        return torch.autocast("cuda", dtype=torch.bfloat16,
                              cache_enabled=not torch.cuda.is_current_stream_capturing())
    return contextlib.nullcontext()
