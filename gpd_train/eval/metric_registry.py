"""The evaluation's metrics, a registry: each declares its row key in report.json, its
column in report.md, how it is computed, its interval and which way is better; the
evaluation (``evaluate``), report.md (``report``) and report.html (``report_page``) read
it, so a metric's key is spelled here alone. A new metric is ``register(Metric(...))``.

``compute(judge, sample)`` measures one evaluated set; what it returns depends on the
metric's ``interval``:

- ``MEAN``: per-video values [N] (a mean over videos; bootstrap interval,
  ``metrics.mean_interval``), or None where the row is its own reference;
- ``HALF_SAMPLE``: a statistic of a subset of the videos, ``f(indices) -> float`` (a
  distance between sets; half-sample interval, ``metrics.half_sample_interval``);
- ``NONE``: a number, no interval;
- ``OWN``: ``(value, interval, extra row entries)``, the metric's own interval.

A ``paired`` metric (MEAN or HALF_SAMPLE) is also compared between rows on the same videos
(report.json ``comparisons``, under that name).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from gpd_train.errors import ConfigError
from gpd_train.eval.metrics import (
    first_frame_psnr,
    frechet_distance,
    half_sample_interval,
    high_frequency_share,
    mean_interval,
    motion_energy,
    psnr_per_video,
)

MEAN, HALF_SAMPLE, NONE, OWN = "mean", "half-sample", "none", "own"  # interval kinds
HIGHER, LOWER, NEAR_ONE = "higher", "lower", "near one"  # which way is better
# What a metric needs of the judge (the attribute that is None without it): the learned
# feature net and the data's labels ("net", built-in data only) or the detail metric.
# "first_frames": image-to-video runs only (each video's condition frame).
NEEDS = (None, "net", "detail", "first_frames")


@dataclass(frozen=True)
class Sample:
    """One evaluated set: the videos of a row and of the row it is measured against."""

    label: str
    reference_label: str
    videos: torch.Tensor
    reference: torch.Tensor
    seconds: float  # wall-clock sampling seconds per video
    # False for a set that was not generated from the evaluation's conditions (held-out data)
    sampled: bool = True


@dataclass(frozen=True)
class Metric:
    """One metric: ``key`` in report.json rows (``key_ci`` its interval), ``title`` its
    column in report.md (``digits`` after the point), ``plot`` its panel title in
    report.html's quality plot (``{reference}`` is the reference row's label; None: not
    plotted), ``required``: every report.json row has it (the page refuses a row without)."""

    key: str
    title: str
    compute: Callable[[Any, Sample], Any]
    interval: str
    better: str | None = None
    digits: int = 2
    needs: str | None = None
    paired: str | None = None
    plot: str | None = None
    required: bool = False

    def __post_init__(self) -> None:
        if self.interval not in (MEAN, HALF_SAMPLE, NONE, OWN) or self.needs not in NEEDS:
            raise ConfigError(f"metric {self.key!r}: interval must be one of "
                              f"{[MEAN, HALF_SAMPLE, NONE, OWN]} and needs one of {list(NEEDS)}, "
                              f"got {self.interval!r} and {self.needs!r}")
        if self.paired and self.interval not in (MEAN, HALF_SAMPLE):
            raise ConfigError(f"metric {self.key!r}: a paired comparison needs a {MEAN} or "
                              f"{HALF_SAMPLE} interval, got {self.interval!r}")

    def available(self, judge: Any) -> bool:
        return self.needs is None or getattr(judge, self.needs) is not None

    def entries(self, measured: Any, count: int) -> dict[str, Any]:
        """The row entries of what ``compute`` returned for a set of ``count`` videos."""
        if measured is None:
            return {self.key: None}
        if self.interval == MEAN:
            return {self.key: float(measured.mean()), f"{self.key}_ci": mean_interval(measured)}
        if self.interval == HALF_SAMPLE:
            return {self.key: measured(torch.arange(count)),
                    f"{self.key}_ci": half_sample_interval(measured, count)}
        if self.interval == OWN:
            value, interval, extra = measured
            return {self.key: value, f"{self.key}_ci": interval, **extra}
        return {self.key: measured}

    def difference(self, a: Any, b: Any, count: int) -> dict[str, Any]:
        """``a - b`` of two rows' measures on the same videos, with its paired interval."""
        if self.interval == MEAN:
            diff = a - b
            return {"metric": self.paired, "value": float(diff.mean()),
                    "ci": mean_interval(diff)}

        def gap(idx: torch.Tensor) -> float:
            return a(idx) - b(idx)

        return {"metric": self.paired, "value": gap(torch.arange(count)),
                "ci": half_sample_interval(gap, count)}

    def plot_title(self, reference: str) -> str:
        return self.plot.format(reference=reference) + f", {self.better} is better"


_REGISTRY: dict[str, Metric] = {}
METRICS: Mapping[str, Metric] = MappingProxyType(_REGISTRY)


def register(metric: Metric) -> Metric:
    """Add ``metric`` (its column after the registered ones); its key must be new."""
    if metric.key in _REGISTRY:
        raise ConfigError(f"metric {metric.key!r} is already registered")
    _REGISTRY[metric.key] = metric
    return metric


def unregister(key: str) -> None:
    """Remove a metric registered by a plug-in or a test."""
    del _REGISTRY[key]


def columns(rows: list[dict[str, Any]]) -> list[Metric]:
    """The metrics report.md shows for ``rows``: those that need something of the judge (the
    learned features, the detail metric, condition frames) only where the rows have them."""
    return [m for m in _REGISTRY.values() if m.needs is None or m.key in rows[0]]


# -- the built-in metrics, in column order -----------------------------------------------
def _psnr(judge: Any, sample: Sample) -> torch.Tensor | None:
    if sample.label == sample.reference_label:
        return None  # the reference itself: its PSNR would be infinite
    return psnr_per_video(sample.videos, sample.reference)


def _first_frame_psnr(judge: Any, sample: Sample) -> torch.Tensor:
    if not sample.sampled:  # other videos' first frames: no fidelity to measure
        return torch.full((len(sample.videos),), float("nan"))
    return first_frame_psnr(sample.videos, judge.first_frames)


def _fd_data(judge: Any, sample: Sample) -> Callable[[torch.Tensor], float]:
    features = judge.learned_features(sample.label, sample.videos)
    return lambda idx: frechet_distance(features[idx], judge.data_features)


def _fd_ref(judge: Any, sample: Sample) -> float:
    return frechet_distance(judge.learned_features(sample.label, sample.videos),
                            judge.features[sample.reference_label])


def _kid_data(judge: Any, sample: Sample) -> tuple[float, Any, dict[str, Any]]:
    return judge.detail.row(sample.label, sample.videos)


def _prompt_acc(judge: Any, sample: Sample) -> torch.Tensor:
    return judge.correct(sample.videos)


def _hf_ratio(judge: Any, sample: Sample) -> float:
    return high_frequency_share(sample.videos) / high_frequency_share(sample.reference)


def _motion_ratio(judge: Any, sample: Sample) -> float:
    return motion_energy(sample.videos) / motion_energy(sample.reference)


def _seconds(judge: Any, sample: Sample) -> float:
    return sample.seconds


PSNR = register(Metric("psnr_db", "PSNR to ref (dB)", _psnr, MEAN, HIGHER, paired="PSNR (dB)",
                       plot="PSNR to {reference} (dB)"))
FIRST_FRAME = register(Metric("first_frame_psnr_db", "first-frame PSNR (dB)", _first_frame_psnr,
                              MEAN, HIGHER, needs="first_frames",
                              paired="first-frame PSNR (dB)",
                              plot="first-frame PSNR to its condition (dB)"))
FD_DATA = register(Metric("fd_data", "learned FD to data", _fd_data, HALF_SAMPLE, LOWER,
                          needs="net", paired="learned FD to data", plot="learned FD to data"))
FD_REF = register(Metric("fd_ref", "learned FD to ref", _fd_ref, NONE, LOWER, needs="net"))
KID_DATA = register(Metric("kid_data", "detail KID to data", _kid_data, OWN, LOWER, digits=3,
                           needs="detail"))
HF_RATIO = register(Metric("hf_ratio", "HF ratio", _hf_ratio, NONE, NEAR_ONE, required=True))
MOTION_RATIO = register(Metric("motion_ratio", "motion ratio", _motion_ratio, NONE, NEAR_ONE,
                               required=True))
PROMPT_ACC = register(Metric("prompt_acc", "prompt acc", _prompt_acc, MEAN, HIGHER,
                             needs="net"))
SECONDS = register(Metric("seconds_per_video", "s/video", _seconds, NONE, LOWER, digits=4,
                          required=True))
