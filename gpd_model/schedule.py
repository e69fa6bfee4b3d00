"""Shifted flow-matching sigma grids (Wan2.1 convention: sigma 1 is pure noise)."""

from __future__ import annotations

import math

import torch


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's shift of uniform times ``t`` in [0, 1]: ``shift t / (1 + (shift - 1) t)``.

    Written as ``shift t / (shift t + (1 - t))`` so that ``t = 1`` gives exactly 1.0.
    """
    return shift * t / (shift * t + (1.0 - t))


def sigma_grid(steps: int, shift: float) -> torch.Tensor:
    """Float64 sigmas [steps + 1] from exactly 1.0 down to exactly 0.0.

    ``t_i = 1 - i / steps`` is shifted to ``shift * t / (1 + (shift - 1) * t)``; the
    ``steps // 2`` grid is bit-for-bit the even-indexed points of the ``steps`` grid.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sigma_grid: steps must be an int >= 1, got {steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)):
        raise TypeError(f"sigma_grid: shift must be a real number, got {type(shift).__name__}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"sigma_grid: shift must be finite and > 0, got {shift!r}")
    # i / steps is correctly rounded, so 2j / steps and j / (steps / 2) give the same float.
    t = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift_sigma(t, shift)


def timestep_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """The network's timestep input, ``1000 * sigma``."""
    if isinstance(sigma, torch.Tensor):
        if not (sigma.is_floating_point()):
            raise TypeError(f"timestep_from_sigma: sigma must be floating point, got {sigma.dtype}")
        return sigma * 1000.0
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(
            f"timestep_from_sigma: sigma must be a tensor or float, got {type(sigma).__name__}"
        )
    return 1000.0 * sigma


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-matching state ``x_s = (1 - s) x0 + s eps`` with per-sample ``sigma`` [B]."""
    if clean.shape != noise.shape:
        raise ValueError(f"add_noise: clean {tuple(clean.shape)} and noise "
                         f"{tuple(noise.shape)} must have the same shape")
    if sigma.shape != clean.shape[:1]:
        raise ValueError(f"add_noise: sigma must be [{clean.shape[0]}] (one per sample), got "
                         f"{tuple(sigma.shape)}")
    s = sigma.to(clean.dtype).view(-1, *([1] * (clean.dim() - 1)))
    return (1.0 - s) * clean + s * noise


def _per_sample(
    value: torch.Tensor | float, batch: int, like: torch.Tensor, name: str
) -> torch.Tensor:
    """A float32 [batch] tensor on ``like``'s device from a float, 0-d or [batch] tensor."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(
                f"{name} must be a float or a [{batch}] tensor, got shape {tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {value.dtype}")
        return value.to(device=like.device, dtype=torch.float32)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    return torch.full((batch,), float(value), device=like.device, dtype=torch.float32)


def _broadcast_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (x.ndim - 1)))
