"""Shifted sigma grids."""

from __future__ import annotations

import pytest
import torch

from gpd_model import shift_sigma, sigma_grid, timestep_from_sigma


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 0.37, 12.5])
def test_grid_matches_formula_and_halves_exactly(shift: float) -> None:
    for steps in (1, 3, 6, 24, 48, 50):
        grid = sigma_grid(steps, shift)
        assert grid.dtype == torch.float64 and grid.shape == (steps + 1,)
        assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
        t = [1 - i / steps for i in range(steps + 1)]
        want = torch.tensor([shift * v / (1 + (shift - 1) * v) for v in t], dtype=torch.float64)
        torch.testing.assert_close(grid, want, rtol=1e-14, atol=1e-15)
        assert (grid[1:] < grid[:-1]).all()
    assert torch.equal(sigma_grid(24, shift), sigma_grid(48, shift)[::2])
    assert torch.equal(sigma_grid(3, shift), sigma_grid(6, shift)[::2])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        sigma_grid(0, 5.0)
    with pytest.raises(ValueError, match="shift must be finite and > 0, got -1.0"):
        sigma_grid(4, -1.0)
    with pytest.raises(TypeError, match="shift must be a real number"):
        sigma_grid(4, "5")
    with pytest.raises(TypeError, match="sigma must be floating point"):
        timestep_from_sigma(torch.tensor([1]))
    assert timestep_from_sigma(0.25) == 250.0


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 0.7])
def test_shift_sigma_matches_the_textbook_formula_and_keeps_the_ends(shift):
    t = torch.rand(257, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = shift * t / (1.0 + (shift - 1.0) * t)
    torch.testing.assert_close(shift_sigma(t, shift), want, rtol=1e-14, atol=0)
    ends = shift_sigma(torch.tensor([0.0, 1.0], dtype=torch.float64), shift)
    assert ends.tolist() == [0.0, 1.0]
