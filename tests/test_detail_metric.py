"""The detail metric (gpd_train/eval/detail_metric.py) against float64 loop references, and its
ordering of known degradations of the built-in data."""

import math

import numpy as np
import pytest
import torch

from gpd_train.data.procedural import ProceduralVideos
from gpd_train.eval.detail_metric import (
    BAND_EDGES,
    HELD_OUT_OFFSET,
    DetailJudge,
    KernelToReference,
    band_labels,
    band_spectrum,
    detail_features,
    feature_groups,
    freeze,
    gaussian_blur,
    kernel_distance,
    real_videos,
    sanity_pairs,
    sanity_sets,
    shuffle_frames,
    spectral_features,
)
from gpd_train.eval.feature_net import train_feature_net
from gpd_train.eval.metric_registry import KID_DATA


def kid_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 the slow way: every ordered pair, the kernel written out in float64."""
    d = x.shape[1]

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return (sum(float(a) * float(b) for a, b in zip(u, v, strict=True)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2.0 * xy


@pytest.mark.parametrize("m,n,d", [(2, 2, 1), (2, 3, 3), (3, 2, 1), (5, 7, 2), (17, 9, 4),
                                   (33, 40, 7)])
def test_kid_matches_a_float64_double_loop(m, n, d):
    gen = torch.Generator().manual_seed(m * 100 + n * 10 + d)
    x = torch.randn(m, d, generator=gen) * 1.5 + 0.3
    y = torch.randn(n, d, generator=gen)
    want = kid_by_loops(x.double().numpy(), y.double().numpy())
    assert kernel_distance(x, y) == pytest.approx(want, rel=1e-10, abs=1e-12)
    # Subsets read from the kernels made once are the subsets' own KID.
    if m >= 4:
        idx = torch.randperm(m, generator=gen)[: m // 2]
        assert KernelToReference(x, y)(idx) == pytest.approx(kernel_distance(x[idx], y),
                                                              rel=1e-10, abs=1e-12)


def test_kid_is_unbiased_for_one_distribution_and_sees_a_shift():
    gen = torch.Generator().manual_seed(0)
    repeats, m, n, d = 2000, 4, 5, 3
    same, biased, shifted = [], [], []
    for _ in range(repeats):
        x = torch.randn(m, d, generator=gen, dtype=torch.float64)
        y = torch.randn(n, d, generator=gen, dtype=torch.float64)
        same.append(kernel_distance(x, y))
        kxx, kyy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3  # with the diagonal: a V-stat
        biased.append(float(kxx.mean() + kyy.mean() - 2 * ((x @ y.T / d + 1) ** 3).mean()))
        shifted.append(kernel_distance(x + 0.5, y))
    for values, low, high in ((same, -4, 4), (biased, 10, math.inf), (shifted, 10, math.inf)):
        values = torch.tensor(values, dtype=torch.float64)
        z = float(values.mean() / (values.std() / math.sqrt(repeats)))  # mean in standard errors
        assert low < z < high, (low, z)


def test_kid_errors():
    with pytest.raises(ValueError, match=r"KID features must be \[N >= 2, F\], got \(1, 3\)"):
        kernel_distance(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="KID feature sizes differ: 3 vs 2"):
        kernel_distance(torch.zeros(4, 3), torch.zeros(4, 2))


def blur_by_loops(frame: np.ndarray, sigma: float) -> np.ndarray:
    radius = math.ceil(3 * sigma)
    w = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    w /= w.sum()
    h, wd = frame.shape
    out = np.zeros((h, wd))
    for y in range(h):
        for x in range(wd):
            for i, dy in enumerate(range(-radius, radius + 1)):
                for j, dx in enumerate(range(-radius, radius + 1)):
                    out[y, x] += w[i] * w[j] * frame[min(max(y + dy, 0), h - 1),
                                                     min(max(x + dx, 0), wd - 1)]
    return out


@pytest.mark.parametrize("shape,sigma", [((1, 1, 2, 5, 7), 0.5), ((2, 3, 1, 9, 4), 1.0),
                                         ((1, 2, 3, 3, 3), 1.3)])
def test_gaussian_blur_matches_a_loop_with_replicated_edges(shape, sigma):
    gen = torch.Generator().manual_seed(int(sigma * 10))
    videos = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    got = gaussian_blur(videos, sigma).numpy()
    flat = videos.numpy().reshape(-1, *shape[-2:])
    want = np.stack([blur_by_loops(f, sigma) for f in flat]).reshape(shape)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="blur sigma must be > 0 latent pixels, got 0"):
        gaussian_blur(videos, 0)


def test_shuffle_and_freeze_break_time_only():
    gen = torch.Generator().manual_seed(1)
    videos = torch.randn(64, 2, 4, 3, 3, generator=gen)
    shuffled = shuffle_frames(videos, seed=3)
    assert torch.equal(shuffled, shuffle_frames(videos, seed=3))
    for original, moved in zip(videos, shuffled, strict=True):
        order = [next(t for t in range(4) if torch.equal(moved[:, s], original[:, t]))
                 for s in range(4)]
        assert sorted(order) == [0, 1, 2, 3] and order not in ([0, 1, 2, 3], [3, 2, 1, 0])
    frozen = freeze(videos)
    assert torch.equal(frozen, videos[:, :, :1].expand_as(videos))
    with pytest.raises(ValueError, match="shuffling needs >= 3 frames"):
        shuffle_frames(videos[:, :, :2], seed=0)
    two = ProceduralVideos(8, frames=2, size=8)  # no shuffled row: two frames only reverse
    labels = [label for label, _, _ in sanity_sets(two, "t", real_videos(two, 4), seed=0)]
    assert labels == ["data, held out", "t blurred sigma=0.5 px", "t blurred sigma=1 px",
                      "t frozen (first frame)"]


def test_spectral_features_against_direct_sums():
    gen = torch.Generator().manual_seed(2)
    videos = torch.randn(3, 2, 5, 6, 8, generator=gen, dtype=torch.float64)
    feats = spectral_features(videos)
    bands = len(BAND_EDGES) - 1
    assert feats.shape == (3, 2 * bands + 4)
    for v in range(3):
        for lag in range(1, 5):  # the temporal lags, written out
            diff = videos[v, :, lag:] - videos[v, :, :-lag]
            assert float(feats[v, 2 * bands + lag - 1]) == pytest.approx(
                math.sqrt(float(diff.square().mean())), rel=1e-12)
    # The band energies ignore where the content is (a circular shift) ...
    rolled = torch.roll(videos, shifts=(2, 3), dims=(-2, -1))
    torch.testing.assert_close(spectral_features(rolled)[:, :2 * bands], feats[:, :2 * bands])
    single = torch.zeros(1, 1, 2, 8, 8, dtype=torch.float64)
    single[...] = torch.tensor([1.0, -1.0] * 4)  # ... and put x's Nyquist at radius 0.71
    top = spectral_features(single)[0, :bands]
    assert top[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
    # Its power, 64 (Parseval, orthonormal FFT) in one bin, is averaged over the band's bins.
    cells = sum(1 for ky in range(8) for kx in range(8)
                if 0.5 < math.sqrt(((min(ky, 8 - ky) / 4) ** 2 + (min(kx, 8 - kx) / 4) ** 2) / 2)
                <= 0.75)
    assert float(top[2]) == pytest.approx(math.sqrt(64 / cells), rel=1e-12)
    assert float(spectral_features(freeze(videos))[:, bands:].abs().max()) == 0.0


@pytest.fixture(scope="module")
def judged():
    """The demo's data shape; the data itself is the sharp set (no teacher needed)."""
    data = ProceduralVideos(8, frames=4, size=16)
    judge = DetailJudge.build(train_feature_net(data, seed=0, steps=30), real_videos(data, 64))
    return data, judge


def kid_row(judge, label, videos):
    """The report row entries of ``judge.row`` (kid_data, its interval, kid_parts)."""
    return KID_DATA.entries(judge.row(label, videos), len(videos))


def test_detail_kid_orders_known_degradations_of_the_data(judged):
    """The report's sanity rows and ordering steps, with data videos in the teacher's
    place: held-out data ~ the sharp set < blurred 0.5 px < blurred 1 px; shuffled and
    frozen frames far beyond."""
    data, judge = judged
    sharp = real_videos(data, 64, 3 * HELD_OUT_OFFSET)
    rows = {"sharp": kid_row(judge, "sharp", sharp)}
    made = sanity_sets(data, "sharp", sharp, seed=0)
    assert [from_teacher for _, from_teacher, _ in made] == [False, True, True, True, True]
    rows |= {label: kid_row(judge, label, videos) for label, _, videos in made}
    held_out, blur_half, blur_one, shuffled, frozen = (label for label, _, _ in made)
    assert held_out == "data, held out" and blur_half == "sharp blurred sigma=0.5 px"
    for a, b in ((held_out, blur_half), (blur_half, blur_one)):  # beyond both intervals
        assert rows[a]["kid_data_ci"][1] < rows[b]["kid_data_ci"][0], (a, b)
    same, *steps = judge.comparisons(sanity_pairs("sharp", []))
    assert (same["a"], same["b"]) == ("sharp", held_out) and same["ci"][0] < 0 < same["ci"][1]
    assert [(item["a"], item["b"]) for item in steps] == [
        (blur_half, "sharp"), (blur_one, blur_half), (shuffled, "sharp"), (frozen, "sharp")]
    assert all(item["ci"][0] > 0 for item in steps)
    # The data against itself: near 0 (a little below: both sets hold every prompt equally
    # often, which i.i.d. sets would not).
    assert abs(rows[held_out]["kid_data"]) < 0.2 * rows[blur_half]["kid_data"]
    low, high = rows["sharp"]["kid_data_ci"]
    for broken in (shuffled, frozen):  # far: > 10 of the sharp set's interval widths away
        assert rows[broken]["kid_data"] - rows["sharp"]["kid_data"] > 10 * (high - low)


def bands_by_fft(frames: torch.Tensor) -> list[float]:
    """RMS amplitude of frames [C, T, H, W] per radial band, written out bin by bin from
    torch.fft in float64, the radius from fftfreq (|k / n| over Nyquist's 1/2)."""
    c, t, h, w = frames.shape
    power = torch.zeros(h, w, dtype=torch.float64)
    for channel in range(c):
        for time in range(t):
            plane = frames[channel, time].double()
            power += torch.fft.fftn(plane - plane.mean(), norm="ortho").abs().square()
    power /= c * t
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64).abs() * 2, \
        torch.fft.fftfreq(w, dtype=torch.float64).abs() * 2
    sums, counts = [0.0] * 4, [0] * 4
    for y in range(h):
        for x in range(w):
            radius = math.sqrt((float(fy[y]) ** 2 + float(fx[x]) ** 2) / 2)
            for band, (low, high) in enumerate(((0, 0.25), (0.25, 0.5), (0.5, 0.75),
                                                (0.75, 1.0))):
                if low < radius <= high + 1e-12:
                    sums[band] += float(power[y, x])
                    counts[band] += 1
    return [math.sqrt(s / n) if n else 0.0 for s, n in zip(sums, counts, strict=True)]


@pytest.mark.parametrize("shape", [(2, 3, 1, 7, 5), (3, 2, 5, 6, 9), (1, 1, 3, 11, 13),
                                   (2, 1, 2, 5, 16)])
def test_band_spectrum_matches_a_float64_fft_written_out(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    videos = torch.randn(shape, generator=gen) * 0.7 + 0.2  # float32 in, float64 out
    spectrum = band_spectrum(videos)
    frames = shape[2]
    labels = band_labels(frames)
    assert list(spectrum) == list(labels) == (["spatial"] if frames == 1 else
                                              ["spatial", "frame difference", "temporal"])
    assert labels["spatial"] == ["0-0.25", "0.25-0.5", "0.5-0.75", "0.75-1"]
    for v in range(shape[0]):
        video = videos[v].double()
        want = {"spatial": bands_by_fft(video)}
        if frames > 1:
            want["frame difference"] = bands_by_fft(video[:, 1:] - video[:, :-1])
            want["temporal"] = [math.sqrt(float((video[:, k:] - video[:, :-k]).square().mean()))
                                for k in range(1, frames)]
            assert labels["temporal"] == [f"lag {k}" for k in range(1, frames)]
        for group, values in want.items():
            assert spectrum[group].dtype == torch.float64
            np.testing.assert_allclose(spectrum[group][v].numpy(), values, rtol=1e-10,
                                       atol=1e-12, err_msg=group)
    if frames > 1:  # the KID's spectra are these groups side by side
        assert torch.equal(spectral_features(videos), torch.cat(list(spectrum.values()), 1))


def test_each_band_sees_only_its_own_content():
    """A static cosine in one band and a flickering one in another: the spatial group sees
    both in their bands only, the frame difference only the flicker, the lags only odd."""
    size = 16
    grid = torch.arange(size, dtype=torch.float64)
    # Along x only, k cycles: radius (k / 8) / sqrt(2): k = 2 -> 0.18 (band 0), k = 5 ->
    # 0.44 (band 1), k = 8 (Nyquist) -> 0.71 (band 2); the diagonal k = (8, 8) -> 1 (band 3).
    wave = {band: torch.cos(2 * math.pi * k * grid / size).expand(size, size)
            for band, k in ((0, 2), (1, 5), (2, 8))}
    wave[3] = torch.cos(math.pi * (grid[:, None] + grid[None, :]))
    for static in range(4):
        for moving in range(4):
            if static == moving:
                continue
            sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # flicker
            video = (wave[static] + sign[:, None, None] * wave[moving])[None, None]
            spectrum = band_spectrum(video)
            spatial = spectrum["spatial"][0]
            assert set(torch.nonzero(spatial > 1e-9).flatten().tolist()) == {static, moving}
            assert torch.nonzero(spectrum["frame difference"][0] > 1e-9).flatten().tolist() \
                == [moving]
            lags = spectrum["temporal"][0]
            assert lags[1] < 1e-12 < lags[0] and lags[2] == pytest.approx(float(lags[0]))


def test_band_table_ratios_parts_and_the_paired_interval(judged):
    data, judge = judged
    sharp = real_videos(data, 64, 3 * HELD_OUT_OFFSET)
    blurred = gaussian_blur(sharp, 0.5)
    judge.row("sharp", sharp)
    row = kid_row(judge, "blurred", blurred)
    judge.row("copy", sharp.clone())
    table = judge.band_table("sharp", ["sharp", "blurred", "copy"])
    assert table["groups"] == band_labels(4) and table["reference"] == "sharp"
    assert [r["model"] for r in table["rows"]] == ["sharp", "blurred", "copy"]
    want = {group: band_spectrum(videos)
            for group, videos in (("sharp", sharp), ("blurred", blurred))}
    flat = {name: torch.cat(list(s.values()), 1).mean(0) for name, s in want.items()}
    np.testing.assert_allclose(table["rows"][0]["amplitude"], flat["sharp"].numpy(), rtol=1e-12)
    np.testing.assert_allclose(table["rows"][1]["ratio"],
                               (flat["blurred"] / flat["sharp"]).numpy(), rtol=1e-12)
    np.testing.assert_allclose(table["data"], torch.cat(list(band_spectrum(
        real_videos(data, 64)).values()), 1).mean(0).numpy(), rtol=1e-12)
    copy = table["rows"][2]
    assert copy["ratio"] == [1.0] * 11 and all(ci == (1.0, 1.0) for ci in copy["ratio_ci"])
    # Blur keeps the coarsest ring, takes most of the finest, and the intervals say so.
    ratio, ci = table["rows"][1]["ratio"], table["rows"][1]["ratio_ci"]
    assert ratio[3] < 0.5 and ci[3][1] < 1 and ratio[7] < 0.5 and ci[7][1] < 1
    assert ci[0][0] <= ratio[0] <= ci[0][1]
    # Each feature group's KID is the KID of those standardised columns alone.
    features = (detail_features(judge.net, blurred) - judge.center) / judge.scale
    for group, columns in feature_groups(4).items():
        assert row["kid_parts"][group] == pytest.approx(kernel_distance(
            features[:, columns], judge.data_features[:, columns]), rel=1e-10)
    assert row["kid_parts"]["spatial"] > 10 * abs(kid_row(judge, "copy", sharp)["kid_parts"]
                                                  ["spatial"])
    (paired,) = judge.comparisons([("blurred", "sharp")])
    assert set(paired["parts"]) == {"semantic", "spatial", "frame difference", "temporal"}
    spatial = paired["parts"]["spatial"]
    assert spatial["ci"][0] > 0 and spatial["value"] == pytest.approx(
        row["kid_parts"]["spatial"] - kid_row(judge, "sharp", sharp)["kid_parts"]["spatial"])
