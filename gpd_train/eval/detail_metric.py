"""The detail metric: a kernel distance (KID) in features that see fine detail and time.

The learned FD's features (gpd_train/eval/feature_net.py) were trained to name shape, motion
and position, so they are nearly blind to how sharp a video is: a 3-step student keeping
94% of the teacher's high-frequency energy scored like the teacher. Here each video's
features are those 32 semantic numbers next to measured spectra, each an RMS amplitude
in the video's own units:

- spatial: each frame (mean removed) in 4 radial frequency bands, the radius normalised
  per axis to Nyquist (``metrics.spectral_radius``): blur, ringing and noise;
- the same 4 bands of the frame-to-frame difference: fine detail of what moves (smeared
  or flickering edges);
- temporal: ``x[t + k] - x[t]`` for every lag ``k``: shuffled frames raise the short lags
  against the long ones, frozen frames zero them all.

Amplitudes, not log powers: a band the data barely fills (near Nyquist) then weighs
little, so a teacher's faint high-frequency noise, which fewer sampling steps smooth
away, does not outweigh the loss of the edges' detail (in log units it did, and naive
sampling at 12 steps scored closer to the data than at 48).

The semantic features are standardised by the real data's spread per dimension; the
spectra as one block, by the data's pooled spread, which keeps their relative sizes.
The distance to the data is then the unbiased U-statistic estimate of MMD^2 with the
polynomial kernel ``k(x, y) = (x.y / d + 1)^3`` (KID). Unlike the Frechet distance it
has no size bias, so 192 videos suffice to compare rows, and its paired differences
resolve them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gpd_train.data.procedural import ProceduralVideos
from gpd_train.errors import ConfigError
from gpd_train.eval.feature_net import FEATURES, VideoFeatureNet, video_features
from gpd_train.eval.metrics import (
    bootstrap_interval,
    check_videos,
    half_sample_interval,
    spectral_radius,
)

# Band edges over the normalised radius in (0, 1]; the DC term is excluded (mean removed).
BAND_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0 + 1e-9)
# Real-data indices: sample i of the evaluation has prompt i mod num_prompts; these
# multiples of num_prompts keep that and stay apart from each other and from
# feature_net's training and held-out ranges (10**9, 2 * 10**9).
REAL_OFFSET = 10**6
HELD_OUT_OFFSET = 2 * 10**6
BLUR_SIGMAS = (0.5, 1.0)  # latent pixels
SANITY = "sanity: known sets and degradations"
METRIC = "detail KID to data"
SEMANTIC = "semantic"
SPATIAL, FRAME_DIFFERENCE, TEMPORAL = "spatial", "frame difference", "temporal"


def _band_amplitudes(frames: torch.Tensor) -> torch.Tensor:
    """RMS amplitude [N, bands] of ``frames`` [N, C, T, H, W] in the radial bands."""
    centred = frames - frames.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centred, norm="ortho").abs().square().mean(dim=(1, 2))  # [N, H, W]
    radius = spectral_radius(*frames.shape[-2:])
    bands = []
    for low, high in zip(BAND_EDGES[:-1], BAND_EDGES[1:], strict=True):
        inside = (radius > low) & (radius <= high)
        mean = power[:, inside].mean(dim=1) if bool(inside.any()) else power.new_zeros(len(power))
        bands.append(mean)
    return torch.stack(bands, dim=1).sqrt()


def band_labels(frames: int) -> dict[str, list[str]]:
    """Each band group's band names for videos of ``frames`` frames (the order of
    ``band_spectrum``; a single frame has no frame differences and no lags)."""
    radial = [f"{low:g}-{min(high, 1.0):g}" for low, high in zip(BAND_EDGES[:-1], BAND_EDGES[1:],
                                                                   strict=True)]
    labels = {SPATIAL: radial}
    if frames >= 2:
        labels |= {FRAME_DIFFERENCE: radial, TEMPORAL: [f"lag {k}" for k in range(1, frames)]}
    return labels


def band_spectrum(videos: torch.Tensor) -> dict[str, torch.Tensor]:
    """RMS amplitudes (float64) of videos [N, C, T, H, W] by band group: ``spatial``
    [N, bands] (each frame), ``frame difference`` [N, bands] (``x[t + 1] - x[t]``) and
    ``temporal`` [N, T - 1] (``x[t + k] - x[t]`` per lag k); the last two need T >= 2."""
    check_videos(videos, "videos")
    x = videos.double()
    spectrum = {SPATIAL: _band_amplitudes(x)}
    if x.shape[2] >= 2:
        lags = [(x[:, :, k:] - x[:, :, :-k]).square().mean(dim=(1, 2, 3, 4))
                for k in range(1, x.shape[2])]
        spectrum |= {FRAME_DIFFERENCE: _band_amplitudes(x[:, :, 1:] - x[:, :, :-1]),
                     TEMPORAL: torch.stack(lags, dim=1).sqrt()}
    return spectrum


def spectral_features(videos: torch.Tensor) -> torch.Tensor:
    """Spatial and temporal amplitudes [N, 2 * bands + T - 1] (float64) of videos
    [N, C, T, H, W]: ``band_spectrum``'s groups side by side."""
    check_videos(videos, "videos")
    if videos.shape[2] < 2:
        raise ConfigError(f"spectral features need >= 2 frames, got {videos.shape[2]}")
    return torch.cat(list(band_spectrum(videos).values()), dim=1)


def detail_features(net: VideoFeatureNet, videos: torch.Tensor) -> torch.Tensor:
    """The learned semantic features beside the spectra [N, 32 + 2 * bands + T - 1]."""
    return torch.cat([video_features(net, videos), spectral_features(videos)], dim=1)


def _polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _off_diagonal_mean(kernel: torch.Tensor) -> float:
    n = kernel.shape[0]
    return float((kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1)))


class KernelToReference:
    """KID of subsets of one feature set to a fixed reference set, from kernels made once.

    ``self(indices)`` is the unbiased MMD^2 of ``features[indices]`` (distinct indices,
    at least 2) to the whole reference; intervals evaluate it hundreds of times.
    """

    def __init__(self, features: torch.Tensor, reference: torch.Tensor) -> None:
        for name, feats in (("features", features), ("reference", reference)):
            if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] < 2:
                got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else feats
                raise ConfigError(f"KID {name} must be [N >= 2, F], got {got}")
        if features.shape[1] != reference.shape[1]:
            raise ConfigError(f"KID feature sizes differ: {features.shape[1]} vs "
                              f"{reference.shape[1]}")
        a, b = features.double(), reference.double()
        self.count = len(a)
        self.within = _polynomial_kernel(a, a)
        self.across = _polynomial_kernel(a, b)
        self.reference_term = _off_diagonal_mean(_polynomial_kernel(b, b))

    def __call__(self, indices: torch.Tensor) -> float:
        return (_off_diagonal_mean(self.within[indices][:, indices]) + self.reference_term
                - 2.0 * float(self.across[indices].mean()))

    def full(self) -> float:
        return self(torch.arange(self.count))


def kernel_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """KID: unbiased MMD^2 estimate with the kernel ``(x.y / d + 1)^3`` of sets [N >= 2, d]."""
    return KernelToReference(features_a, features_b).full()


def kid_interval(statistic: Callable[[torch.Tensor], float], count: int) -> tuple[float, float]:
    """95% interval of a KID (or a paired KID difference) over the candidate set's videos.

    Half-samples without replacement, as the report's FD intervals: a bootstrap draw with
    replacement repeats videos, and a repeated pair (i, j) with x_i = x_j puts the squared
    norm k(x, x) into the U-statistic's distinct-pair mean, biasing every resample upwards.
    A half-sample keeps all pairs distinct, its U-statistic is unbiased at any size, and the
    finite-population factor gives it the full set's first-order variance; the mean over
    all half-samples is exactly the full set's U-statistic, so the centring shift in
    ``half_sample_interval`` only removes Monte Carlo noise. The reference set is held fixed
    (as for FD), so the interval is the spread due to the candidate's videos.
    """
    return half_sample_interval(statistic, count)


def gaussian_blur(videos: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each frame blurred spatially by a Gaussian of ``sigma`` latent pixels.

    The kernel is the Gaussian sampled at integer offsets up to ceil(3 sigma), normalised
    to sum 1, applied along H then W with edge pixels replicated (the background goes on).
    """
    check_videos(videos, "videos")
    if not sigma > 0:
        raise ConfigError(f"blur sigma must be > 0 latent pixels, got {sigma!r}")
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = (-offsets.square() / (2 * sigma**2)).exp()
    weights = (weights / weights.sum()).to(videos.dtype)
    n, c, t, h, w = videos.shape
    frames = videos.reshape(n * c * t, 1, h, w)
    frames = F.conv2d(F.pad(frames, (0, 0, radius, radius), mode="replicate"),
                      weights.view(1, 1, -1, 1))
    frames = F.conv2d(F.pad(frames, (radius, radius, 0, 0), mode="replicate"),
                      weights.view(1, 1, 1, -1))
    return frames.reshape(n, c, t, h, w)


def shuffle_frames(videos: torch.Tensor, seed: int) -> torch.Tensor:
    """Each video's frames in a random order that is neither the original nor reversed
    (a reversed linear motion is another valid video); deterministic from ``seed``."""
    check_videos(videos, "videos")
    frames = videos.shape[2]
    if frames < 3:
        raise ConfigError(f"shuffling needs >= 3 frames (2 only reverse), got {frames}")
    generator = torch.Generator().manual_seed(seed)
    forward = torch.arange(frames)
    orders = []
    for _ in range(len(videos)):
        order = torch.randperm(frames, generator=generator)
        while torch.equal(order, forward) or torch.equal(order, forward.flip(0)):
            order = torch.randperm(frames, generator=generator)
        orders.append(order)
    index = torch.stack(orders).view(len(videos), 1, frames, 1, 1).expand_as(videos)
    return videos.gather(2, index.to(videos.device))


def freeze(videos: torch.Tensor) -> torch.Tensor:
    """Every frame replaced by the first: no motion at all."""
    check_videos(videos, "videos")
    return videos[:, :, :1].expand_as(videos).contiguous()


def real_videos(data: ProceduralVideos, count: int, offset: int = REAL_OFFSET) -> torch.Tensor:
    """``count`` distinct data videos, the i-th of the evaluation's prompt i mod num_prompts."""
    return data.videos(data.num_prompts * offset + torch.arange(count))


def _sanity_labels(teacher: str) -> tuple[str, list[str], str, str]:
    """Labels of the held-out data, the teacher blurred (by BLUR_SIGMAS), shuffled, frozen."""
    return ("data, held out", [f"{teacher} blurred sigma={s:g} px" for s in BLUR_SIGMAS],
            f"{teacher} frames shuffled", f"{teacher} frozen (first frame)")


def sanity_sets(data: ProceduralVideos, teacher_label: str, teacher: torch.Tensor,
                seed: int) -> list[tuple[str, bool, torch.Tensor]]:
    """The sets whose order the metric must get right: (label, made from the teacher's
    videos, videos). Held-out data (other videos of the same prompts) sits nearest the
    data; blur and broken time must each land beyond the teacher."""
    held_out, blurred, shuffled, frozen = _sanity_labels(teacher_label)
    sets = [(held_out, False, real_videos(data, len(teacher), HELD_OUT_OFFSET))]
    sets += [(label, True, gaussian_blur(teacher, sigma))
             for label, sigma in zip(blurred, BLUR_SIGMAS, strict=True)]
    if teacher.shape[2] >= 3:  # two frames can only be reversed: a valid video again
        sets.append((shuffled, True, shuffle_frames(teacher, seed)))
    return sets + [(frozen, True, freeze(teacher))]


def sanity_pairs(teacher_label: str, naive_ladder: list[str]) -> list[tuple[str, str]]:
    """Paired differences ``a - b`` that show each ordering step: the sanity rows, then
    naive sampling from the most steps to the fewest."""
    held_out, blurred, shuffled, frozen = _sanity_labels(teacher_label)
    ladder = [teacher_label, *blurred]
    pairs = [(teacher_label, held_out), *zip(ladder[1:], ladder[:-1], strict=True),
             (shuffled, teacher_label), (frozen, teacher_label)]
    return pairs + list(zip(naive_ladder[1:], naive_ladder[:-1], strict=True))


def feature_groups(frames: int) -> dict[str, slice]:
    """The columns of ``detail_features`` by group: the learned ``semantic`` features, then
    ``band_spectrum``'s groups, for videos of ``frames`` frames."""
    groups, begin = {SEMANTIC: slice(0, FEATURES)}, FEATURES
    for group, names in band_labels(frames).items():
        groups[group] = slice(begin, begin + len(names))
        begin += len(names)
    return groups


@dataclass
class DetailJudge:
    """Every set's detail KID to the real data videos; kernels (whole and by feature
    group) and band amplitudes kept by row label for the paired differences and the band
    table."""

    net: VideoFeatureNet
    center: torch.Tensor
    scale: torch.Tensor
    data_features: torch.Tensor
    data_spectra: torch.Tensor  # the real videos' band amplitudes [N, F - FEATURES]
    frames: int
    kernels: dict[str, KernelToReference] = field(default_factory=dict)
    part_kernels: dict[str, dict[str, KernelToReference]] = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, net: VideoFeatureNet, real: torch.Tensor) -> DetailJudge:
        raw = detail_features(net, real)
        # The spectra are scaled as one block: per dimension, a band the data hardly varies
        # in (a power spectrum ignores where the shape is, so the data holds about one
        # spectrum per shape) would put any model's small offset there hundreds of units
        # away and drown every other feature.
        spectra = raw[:, FEATURES:]
        scale = torch.cat([raw[:, :FEATURES].std(dim=0).clamp_min(1e-6),
                           spectra.var(dim=0).mean().sqrt().clamp_min(1e-6).expand(
                               spectra.shape[1])])
        center = raw.mean(dim=0)
        return cls(net, center, scale, (raw - center) / scale, spectra, real.shape[2])

    @property
    def groups(self) -> dict[str, slice]:
        return feature_groups(self.frames)

    def row(self, label: str, videos: torch.Tensor
            ) -> tuple[float, tuple[float, float], dict[str, Any]]:
        """The set's detail KID, its interval and, as a row entry, the KID of each feature
        group alone (``kid_parts``: where the distance sits)."""
        raw = detail_features(self.net, videos)
        self.spectra[label] = raw[:, FEATURES:]
        features = (raw - self.center) / self.scale
        kernel = self.kernels[label] = KernelToReference(features, self.data_features)
        parts = self.part_kernels[label] = {
            group: KernelToReference(features[:, columns], self.data_features[:, columns])
            for group, columns in self.groups.items()}
        return (kernel.full(), kid_interval(kernel, kernel.count),
                {"kid_parts": {group: part.full() for group, part in parts.items()}})

    def comparisons(self, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Paired differences ``a - b`` of the detail KID, and of each feature group's
        (``parts``): the same half-samples of video indices for both rows (same prompts
        and noise), so what they share cancels."""
        out = []
        for a, b in pairs:
            if a not in self.kernels or b not in self.kernels:
                continue
            if self.kernels[a].count != self.kernels[b].count:
                raise ConfigError(f"paired KID needs sets of one size, got {a!r} with "
                                  f"{self.kernels[a].count} videos and {b!r} with "
                                  f"{self.kernels[b].count}")
            value, ci = _paired_gap(self.kernels[a], self.kernels[b])
            parts = {group: dict(zip(("value", "ci"), _paired_gap(
                self.part_kernels[a][group], self.part_kernels[b][group]), strict=True))
                for group in self.groups}
            out.append({"a": a, "b": b, "metric": METRIC, "value": value, "ci": ci,
                        "parts": parts})
        return out

    def band_table(self, reference: str, labels: list[str]) -> dict[str, Any]:
        """Where detail goes: the mean band amplitudes (``band_spectrum``'s groups) of the
        data, the ``reference`` row and each row of ``labels``, and each row's amplitude over
        the reference's with a paired bootstrap 95% interval (the same noise and prompt
        per video, so a ratio whose interval excludes 1 is a real loss or gain)."""
        ref = self.spectra[reference]
        rows = [{"model": reference, "amplitude": ref.mean(dim=0).tolist()}]
        for label in labels:
            if label == reference:
                continue
            amplitude = self.spectra[label]
            rows.append({"model": label, "amplitude": amplitude.mean(dim=0).tolist(),
                         "ratio": (amplitude.mean(dim=0) / ref.mean(dim=0)).tolist(),
                         "ratio_ci": [bootstrap_interval(
                             lambda idx, j=j, a=amplitude: float(a[idx, j].mean()
                                                                 / ref[idx, j].mean()),
                             len(ref)) for j in range(ref.shape[1])]})
        return {"groups": band_labels(self.frames), "reference": reference,
                "data": self.data_spectra.mean(dim=0).tolist(), "rows": rows}


def _paired_gap(ka: KernelToReference, kb: KernelToReference) -> tuple[float, tuple[float, float]]:
    """``ka - kb`` on the full set and its half-sample interval (same indices for both)."""

    def gap(idx: torch.Tensor) -> float:
        return ka(idx) - kb(idx)

    return gap(torch.arange(ka.count)), kid_interval(gap, ka.count)
