"""Evaluation metrics against independent float64 / closed-form references."""

import math

import numpy as np
import pytest
import torch

from gpd_train.evaluate import (
    frechet_distance,
    high_frequency_share,
    motion_energy,
    psnr,
    video_features,
)


@pytest.mark.parametrize("shape", [(1, 3, 1, 1, 1), (3, 3, 5, 7, 9), (2, 16, 4, 6, 10)])
def test_psnr_matches_numpy(shape):
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(shape, generator=gen) * 2 - 1
    out = ref + 0.1 * torch.randn(shape, generator=gen)
    a, b = out.numpy().astype(np.float64), ref.numpy().astype(np.float64)
    want = np.mean([10 * np.log10(4.0 / np.mean((x - y) ** 2)) for x, y in zip(a, b, strict=True)])
    assert psnr(out, ref) == pytest.approx(want, rel=1e-9)
    assert psnr(ref, ref) == math.inf


def test_frechet_distance_closed_forms():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 1, generator=gen, dtype=torch.float64) * 2 + 1
    b = torch.randn(4000, 1, generator=gen, dtype=torch.float64) * 0.5 - 1
    var_a, var_b = a.var().item(), b.var().item()
    want = (a.mean() - b.mean()).item() ** 2 + var_a + var_b - 2 * math.sqrt(var_a * var_b)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    # Diagonal covariances: the trace term is the sum of sqrt(products).
    scale_a, scale_b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 1.0, 0.5])
    x = torch.randn(50000, 3, generator=gen, dtype=torch.float64) * scale_a
    y = torch.randn(50000, 3, generator=gen, dtype=torch.float64) * scale_b
    want = float(((scale_a - scale_b) ** 2).sum())
    assert frechet_distance(x, y) == pytest.approx(want, rel=0.05)
    assert abs(frechet_distance(x, x)) < 1e-8


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match=r"features_a must be \[N >= 2, F\], got \(1, 3\)"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="feature sizes differ: 3 vs 2"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))


def test_high_frequency_share_extremes():
    flat = torch.full((2, 3, 4, 6, 10), 0.3)
    assert high_frequency_share(flat) == 0.0
    rows, cols = torch.arange(6)[:, None], torch.arange(10)[None, :]
    checker = ((rows + cols) % 2 * 2 - 1).float().expand(2, 3, 4, 6, 10)
    assert high_frequency_share(checker) == pytest.approx(1.0)
    smooth = torch.cos(2 * math.pi * cols / 10).float().expand(1, 1, 2, 6, 10)
    assert high_frequency_share(smooth) == pytest.approx(0.0, abs=1e-12)


def test_motion_energy_and_features():
    static = torch.randn(2, 3, 1, 5, 5).expand(2, 3, 4, 5, 5)
    assert motion_energy(static) == 0.0
    ramp = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 2, 4, 3, 3)
    assert motion_energy(ramp) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="motion energy needs >= 2 frames, got 1"):
        motion_energy(torch.zeros(1, 3, 1, 4, 4))
    videos = torch.randn(3, 3, 8, 12, 12)
    features = video_features(videos)
    assert features.shape == (3, 64) and features.dtype == torch.float64
    assert torch.equal(features, video_features(videos))  # a fixed extractor
    with pytest.raises(ValueError, match=r"videos must be a \[N, C, T, H, W\] tensor"):
        video_features(torch.zeros(3, 8, 12, 12))
    with pytest.raises(ValueError, match="must have the same shape"):
        psnr(torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 3, 2, 4, 5))
