"""Evaluation metrics on video sets [N, C, T, H, W], and bootstrap confidence intervals.

Every metric is a mean over videos, or a distance between two sets. A mean's uncertainty
is the bootstrap's (resample the videos with replacement, take the 2.5 and 97.5
percentiles: ``mean_interval``); a Frechet distance's comes from half-samples without
replacement (``half_sample_interval``), since repeated videos bias a covariance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpd_train.errors import ConfigError

BOOTSTRAP_RESAMPLES = 400
BOOTSTRAP_SEED = 0


def check_videos(videos: torch.Tensor, name: str) -> None:
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
        got = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"{name} must be a [N, C, T, H, W] tensor, got {got}")


def _check_pair(videos: torch.Tensor, reference: torch.Tensor) -> None:
    check_videos(videos, "videos")
    check_videos(reference, "reference")
    if videos.shape != reference.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and reference {tuple(reference.shape)} "
                         "must have the same shape")


def psnr_per_video(videos: torch.Tensor, reference: torch.Tensor,
                   peak_to_peak: float = 2.0) -> torch.Tensor:
    """``10 log10(peak_to_peak^2 / MSE)`` [N] (float64; inf where identical)."""
    _check_pair(videos, reference)
    mse = (videos.double() - reference.double()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(peak_to_peak ** 2 / mse)


def first_frame_psnr(videos: torch.Tensor, frames: torch.Tensor,
                     peak_to_peak: float = 2.0) -> torch.Tensor:
    """PSNR [N] of each video's first frame to its condition frame ``frames`` [N, C, H, W]:
    how faithfully an image-to-video model starts from the image it was given."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4:
        got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a [N, C, H, W] tensor, got {got}")
    check_videos(videos, "videos")
    return psnr_per_video(videos[:, :, :1], frames[:, :, None], peak_to_peak)


def psnr(videos: torch.Tensor, reference: torch.Tensor, peak_to_peak: float = 2.0) -> float:
    """Mean over videos of ``10 log10(peak_to_peak^2 / MSE)`` (inf when identical)."""
    return float(psnr_per_video(videos, reference, peak_to_peak).mean())


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, F] (N >= 2)."""
    for name, feats in (("features_a", features_a), ("features_b", features_b)):
        if feats.dim() != 2 or feats.shape[0] < 2:
            raise ValueError(f"{name} must be [N >= 2, F], got {tuple(feats.shape)}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sizes differ: {features_a.shape[1]} vs {features_b.shape[1]}")
    a, b = features_a.double(), features_b.double()
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    mean_term = (a.mean(dim=0) - b.mean(dim=0)).square().sum()
    return float(mean_term + cov_a.trace() + cov_b.trace() - 2.0 * cross)


def spectral_radius(height: int, width: int) -> torch.Tensor:
    """Radius [H, W] (float64) of each FFT bin, each axis normalised to its Nyquist: 1 where
    both axes are at Nyquist, 1/sqrt(2) where one is."""

    def axis(n: int) -> torch.Tensor:
        k = torch.arange(n, dtype=torch.float64)
        return torch.minimum(k, n - k) / (n / 2)

    return ((axis(height)[:, None] ** 2 + axis(width)[None, :] ** 2) / 2).sqrt()


def high_frequency_share(videos: torch.Tensor) -> float:
    """Share of spatial spectral energy above half the Nyquist radius."""
    check_videos(videos, "videos")
    frames = videos.double() - videos.double().mean(dim=(-2, -1), keepdim=True)
    energy = torch.fft.fft2(frames, norm="ortho").abs().square()
    radius = spectral_radius(*videos.shape[-2:])
    total = energy.sum()
    return float(energy[..., radius > 0.5].sum() / total) if total > 0 else 0.0


def motion_energy(videos: torch.Tensor) -> float:
    """Mean |frame_{t+1} - frame_t|."""
    check_videos(videos, "videos")
    if videos.shape[2] < 2:
        raise ValueError(f"motion energy needs >= 2 frames, got {videos.shape[2]}")
    return float((videos[:, :, 1:].double() - videos[:, :, :-1].double()).abs().mean())


def bootstrap_interval(statistic: Callable[[torch.Tensor], float], count: int,
                       resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of ``statistic(indices)`` over resamples of ``count`` items.

    ``statistic`` takes int64 indices [count] (drawn with replacement) into the items. The
    same seed gives every row the same resamples, so paired rows vary together.
    """
    if not isinstance(count, int) or count < 2:
        raise ConfigError(f"bootstrap needs at least 2 items, got {count!r}")
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([statistic(torch.randint(0, count, (count,), generator=generator))
                           for _ in range(resamples)], dtype=torch.float64)
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return float("nan"), float("nan")
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(low), float(high)


def half_sample_interval(statistic: Callable[[torch.Tensor], float], count: int,
                         resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% interval of a set statistic whose estimate depends on the set size (an FD).

    Resampling with replacement repeats items, which a covariance sees as a smaller set: the
    Frechet distance of such resamples is biased upwards and its spread skewed. Half-samples
    drawn without replacement have, to first order, the full set's variance (the finite-
    population factor (n - m) / (n - 1) halves the variance of an m = n / 2 sample), and
    centring their spread on the full estimate removes their size bias.
    """
    if not isinstance(count, int) or count < 4:
        raise ConfigError(f"half-sampling needs at least 4 items, got {count!r}")
    generator = torch.Generator().manual_seed(seed)
    half = count // 2
    values = torch.tensor([statistic(torch.randperm(count, generator=generator)[:half])
                           for _ in range(resamples)], dtype=torch.float64)
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64))
    shift = statistic(torch.arange(count)) - float(values.mean())
    return float(low) + shift, float(high) + shift


def mean_interval(per_item: torch.Tensor) -> tuple[float, float]:
    """Bootstrap interval of the mean of ``per_item`` [N]."""
    per_item = per_item.double()
    return bootstrap_interval(lambda idx: float(per_item[idx].mean()), per_item.numel())
