"""Euler sampler and classifier-free guidance through the denoiser interface."""

from __future__ import annotations

import pytest
import torch

from gpd_model import (
    CFG,
    Conditioning,
    DiTConfig,
    DiTDenoiser,
    WanDiT,
    euler_sample,
    euler_step,
    sigma_grid,
)
from gpd_model.sampler import make_noise

CONFIG = DiTConfig(in_channels=2, out_channels=2, dim=16, ffn_dim=24, num_heads=2, num_layers=1,
                text_dim=5, freq_dim=8)


@pytest.fixture(scope="module")
def model() -> WanDiT:
    torch.manual_seed(3)
    return WanDiT(CONFIG).eval()


def _context(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 5, generator=torch.Generator().manual_seed(seed))


def _cond(batch: int, seed: int) -> Conditioning:
    return Conditioning(_context(batch, seed))


def test_k_step_run_equals_composed_single_steps(model) -> None:
    noise, context = make_noise((2, 2, 3, 4, 2), seed=1), _context(2, 1)
    grid = sigma_grid(5, 3.0)
    denoiser = DiTDenoiser(model)
    full = euler_sample(denoiser, noise, Conditioning(context), grid)
    x = noise
    with torch.no_grad():
        for i in range(5):
            sigma = torch.full((2,), float(grid[i]))
            u = model(x, 1000 * sigma, context)
            x = x + (grid[i + 1] - grid[i]).float() * u
    torch.testing.assert_close(full, x, rtol=1e-6, atol=1e-6)
    chained = noise
    for i in range(5):
        chained = euler_sample(denoiser, chained, Conditioning(context), grid[i : i + 2])
    assert torch.equal(full, chained)


def test_guidance_one_is_conditional_and_general_weight_is_cfg(model) -> None:
    x, context, negative = make_noise((3, 2, 1, 2, 4), seed=2), _context(3, 2), _context(3, 9)
    sigma = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        cond = model(x, 1000 * sigma, context)
        uncond = model(x, 1000 * sigma, negative)
        pair = CFG(DiTDenoiser(model), Conditioning(negative), 1.0)
        torch.testing.assert_close(pair(x, sigma, Conditioning(context)), cond,
                                   rtol=1e-5, atol=1e-6)
        weight = torch.tensor([0.0, 2.5, 7.0])
        pair = CFG(DiTDenoiser(model), Conditioning(negative), weight)
        got = pair(x, sigma, Conditioning(context))
    want = uncond + weight.view(-1, 1, 1, 1, 1) * (cond - uncond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_seeding_is_deterministic_and_per_sample_sigmas_work(model) -> None:
    assert torch.equal(make_noise((2, 3), 5), make_noise((2, 3), 5))
    assert not torch.equal(make_noise((2, 3), 5), make_noise((2, 3), 6))
    noise, cond = make_noise((2, 2, 1, 2, 2), seed=4), _cond(2, 4)
    pair = CFG(DiTDenoiser(model), Conditioning(cond.text[:1] * 0), 4.0)
    first = euler_sample(pair, noise, cond, sigma_grid(3, 2.0))
    second = euler_sample(pair, noise, cond, sigma_grid(3, 2.0))
    assert torch.equal(first, second)
    grids = torch.stack([sigma_grid(3, 2.0), sigma_grid(3, 6.0)], dim=1)
    together = euler_sample(DiTDenoiser(model), noise, cond, grids)
    for b in range(2):
        alone = euler_sample(DiTDenoiser(model), noise[b : b + 1], cond[b : b + 1], grids[:, b])
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-5, atol=1e-6)


def test_sampler_errors_are_named(model) -> None:
    x, cond = make_noise((2, 2, 1, 2, 2), seed=0), _cond(2, 0)
    sigma = torch.tensor([0.5, 0.5])
    denoiser = DiTDenoiser(model)
    with pytest.raises(ValueError, match="CFG: no scale"):
        CFG(denoiser, _cond(1, 1))(x, sigma, cond)
    with pytest.raises(ValueError, match="Conditioning.cat: text shapes do not match"):
        CFG(denoiser, Conditioning(cond.text[:1, :2]), 3.0)(x, sigma, cond)
    with pytest.raises(ValueError, match=r"DiTDenoiser: sigma must be \[2\]"):
        denoiser(x, torch.ones(3), cond)
    with pytest.raises(ValueError, match=r"sigmas must be a \[K\+1\] or \[K\+1, B\] tensor"):
        euler_sample(denoiser, x, cond, torch.ones(1))
    with pytest.raises(ValueError, match="cond must be a Conditioning of batch 2, got 1"):
        euler_sample(denoiser, x, cond[:1], sigma_grid(2, 3.0))
    with pytest.raises(ValueError, match="x and u shapes differ"):
        euler_step(x, x[:1], 1.0, 0.5)
