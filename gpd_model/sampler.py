"""Euler sampling of the flow-matching ODE with batched classifier-free guidance."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .schedule import timestep_from_sigma


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


def euler_step(
    x: torch.Tensor, u: torch.Tensor, s: torch.Tensor | float, s_next: torch.Tensor | float
) -> torch.Tensor:
    """``x + (s_next - s) * u``, sigmas given as floats or per-sample [B] tensors."""
    if x.shape != u.shape:
        raise ValueError(f"euler_step: x and u shapes differ: {tuple(x.shape)} vs {tuple(u.shape)}")
    if x.ndim < 1:
        raise ValueError("euler_step: x must have a batch dimension, got a 0-d tensor")
    batch = x.shape[0]
    delta = _per_sample(s_next, batch, x, "s_next") - _per_sample(s, batch, x, "s")
    return (x + _broadcast_to(delta, x) * u).to(x.dtype)


def model_velocity(
    model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
    guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward at ``sigma`` [B]; ``guidance`` [B] feeds a model's guidance input.

    ``guidance`` is required by, and only accepted by, a model with a guidance input
    (gpd_model.guidance); for a plain model CFG is ``guided_velocity``'s business.
    """
    timestep = timestep_from_sigma(sigma)
    if guidance is None:
        return model(x, timestep, context)
    return model(x, timestep, context, guidance=guidance)


def branch_velocities(
    model: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    context: torch.Tensor,
    neg_context: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(u_cond, u_uncond)`` at ``sigma`` [B]; ``u_uncond`` is None without ``neg_context``.

    With ``neg_context`` both branches run as one forward pass of batch 2B, the form the
    fused CFG kernels (gpd_kernels.cfg_euler_step) consume.
    """
    timestep = timestep_from_sigma(sigma)
    if neg_context is None:
        return model(x, timestep, context), None
    if neg_context.shape != context.shape:
        raise ValueError(
            "branch_velocities: neg_context must match context's shape to batch both branches, "
            f"got {tuple(neg_context.shape)} vs {tuple(context.shape)} (pad the text to one length)"
        )
    both = model(
        torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([context, neg_context])
    )
    u_cond, u_uncond = both.chunk(2)
    return u_cond, u_uncond


def guided_velocity(
    model: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    context: torch.Tensor,
    neg_context: torch.Tensor | None = None,
    guidance: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Velocity at noise level ``sigma`` [B]; with ``guidance`` w, ``u_neg + w (u_cond - u_neg)``.

    The conditional and unconditional branches run as one forward pass of batch 2B.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError("guided_velocity: x must be a batched tensor")
    batch = x.shape[0]
    sigma = _per_sample(sigma, batch, x, "guided_velocity: sigma")
    if guidance is None:
        if neg_context is not None:
            raise ValueError("guided_velocity: neg_context given without guidance")
        return branch_velocities(model, x, sigma, context)[0]
    if neg_context is None:
        raise ValueError("guided_velocity: guidance needs neg_context (the unconditional text)")
    weight = _per_sample(guidance, batch, x, "guided_velocity: guidance")
    u_cond, u_uncond = branch_velocities(model, x, sigma, context, neg_context)
    return torch.lerp(u_uncond, u_cond, _broadcast_to(weight, u_cond).to(u_cond.dtype))


def make_noise(
    shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise that depends only on ``seed`` (drawn on the CPU, then moved)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


@torch.no_grad()
def euler_sample(
    model: nn.Module,
    noise: torch.Tensor,
    context: torch.Tensor,
    sigmas: torch.Tensor,
    neg_context: torch.Tensor | None = None,
    guidance: torch.Tensor | float | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from ``noise`` at ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps.

    ``sigmas`` is a grid [K + 1] shared by the batch, or [K + 1, B] for per-sample schedules.
    """
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim not in (1, 2) or sigmas.shape[0] < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(
            f"euler_sample: sigmas must be a [K+1] or [K+1, B] tensor with K >= 1, got {shape}"
        )
    batch = noise.shape[0]
    if sigmas.ndim == 2 and sigmas.shape[1] != batch:
        raise ValueError(
            f"euler_sample: per-sample sigmas must be [K+1, {batch}], got {tuple(sigmas.shape)}"
        )
    steps = range(sigmas.shape[0] - 1)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="euler", unit="step")
    return euler_loop(model, noise, context, sigmas, neg_context, guidance, steps)


def euler_loop(
    model: nn.Module,
    noise: torch.Tensor,
    context: torch.Tensor,
    sigmas: torch.Tensor,
    neg_context: torch.Tensor | None,
    guidance: torch.Tensor | float | None,
    steps: Iterable[int] | None = None,
) -> torch.Tensor:
    """The unchecked loop of ``euler_sample``: Euler steps ``sigmas[i] -> sigmas[i + 1]``.

    Also the body the CUDA-graph sampler captures: given ``sigmas`` as a float32 [K+1, B]
    tensor on the sampling device, no step copies from the host; float32 is also where
    ``euler_sample``'s float64 grid is rounded, so both paths compute the same numbers.
    """
    x = noise
    for i in range(sigmas.shape[0] - 1) if steps is None else steps:
        s, s_next = sigmas[i], sigmas[i + 1]
        u = guided_velocity(model, x, s, context, neg_context, guidance)
        x = euler_step(x, u, s, s_next)
    return x
