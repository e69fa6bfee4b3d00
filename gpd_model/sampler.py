"""Euler sampling of the flow-matching ODE through the denoiser interface (gpd_model.denoiser)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .denoiser import Conditioning, Denoiser
from .schedule import _broadcast_to, _per_sample


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
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: Conditioning,
    sigmas: torch.Tensor,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from ``noise`` at ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps of
    ``denoiser`` (wrap it in ``CFG`` for classifier-free guidance).

    ``sigmas`` is a grid [K + 1] shared by the batch, or [K + 1, B] for per-sample schedules.
    """
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim not in (1, 2) or sigmas.shape[0] < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(
            f"euler_sample: sigmas must be a [K+1] or [K+1, B] tensor with K >= 1, got {shape}"
        )
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1:
        raise ValueError("euler_sample: noise must be a batched tensor")
    batch = noise.shape[0]
    if not isinstance(cond, Conditioning) or cond.batch != batch:
        got = cond.batch if isinstance(cond, Conditioning) else type(cond).__name__
        raise ValueError(f"euler_sample: cond must be a Conditioning of batch {batch}, got {got}")
    if sigmas.ndim == 2 and sigmas.shape[1] != batch:
        raise ValueError(
            f"euler_sample: per-sample sigmas must be [K+1, {batch}], got {tuple(sigmas.shape)}"
        )
    steps = range(sigmas.shape[0] - 1)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="euler", unit="step")
    return euler_loop(denoiser, noise, cond, sigmas, steps)


def euler_loop(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: Conditioning,
    sigmas: torch.Tensor,
    steps: Iterable[int] | None = None,
) -> torch.Tensor:
    """The unchecked loop of ``euler_sample``: Euler steps ``sigmas[i] -> sigmas[i + 1]``.

    Also the body the CUDA-graph sampler captures: given ``sigmas`` as a float32 [K+1, B]
    tensor on the sampling device, no step copies from the host; float32 is also where
    ``euler_sample``'s float64 grid is rounded, so both paths compute the same numbers.
    """
    x = noise
    batch = noise.shape[0]
    for i in range(sigmas.shape[0] - 1) if steps is None else steps:
        s, s_next = sigmas[i], sigmas[i + 1]
        u = denoiser(x, _per_sample(s, batch, x, "euler_sample: sigma"), cond)
        x = euler_step(x, u, s, s_next)
    return x
