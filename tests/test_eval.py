"""Evaluation metrics against independent float64 / closed-form references."""

import math

import numpy as np
import pytest
import torch

from gpd_train.data.procedural import ProceduralVideos
from gpd_train.eval.evaluate import perturbed
from gpd_train.eval.feature_net import (
    HELD_OUT_OFFSET,
    feature_net,
    train_feature_net,
    video_features,
)
from gpd_train.eval.metrics import (
    bootstrap_interval,
    frechet_distance,
    half_sample_interval,
    high_frequency_share,
    mean_interval,
    motion_energy,
    psnr,
    psnr_per_video,
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
    with pytest.raises(ValueError, match=r"videos must be a \[N, C, T, H, W\] tensor"):
        motion_energy(torch.zeros(3, 8, 12, 12))
    with pytest.raises(ValueError, match="must have the same shape"):
        psnr(torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 3, 2, 4, 5))


@pytest.mark.parametrize("count", [2, 7, 96])
def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation(count):
    gen = torch.Generator().manual_seed(count)
    values = torch.randn(count, generator=gen, dtype=torch.float64) * 3 + 1
    low, high = mean_interval(values)
    assert low <= float(values.mean()) <= high
    if count >= 96:  # large n: the percentile interval ~ mean +- 1.96 sd / sqrt(n)
        half = 1.96 * float(values.std(correction=0)) / math.sqrt(count)
        assert (high - low) / 2 == pytest.approx(half, rel=0.2)
    assert bootstrap_interval(lambda idx: 5.0, count) == (5.0, 5.0)  # a constant statistic
    with pytest.raises(ValueError, match="at least 2 items"):
        mean_interval(torch.ones(1))


def test_half_sample_interval_has_the_full_sets_spread_and_no_size_bias():
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(400, generator=gen, dtype=torch.float64) * 2 + 3
    low, high = half_sample_interval(lambda idx: float(values[idx].mean()), 400)
    half = 1.96 * float(values.std(correction=0)) / math.sqrt(400)
    assert (high - low) / 2 == pytest.approx(half, rel=0.2)
    # A statistic with a 1/m size bias (as an FD's): the interval still brackets the
    # full-set value, where resampling with replacement sits wholly above it.
    features = torch.randn(96, 8, generator=gen, dtype=torch.float64)
    reference = torch.randn(2000, 8, generator=gen, dtype=torch.float64)
    full = frechet_distance(features, reference)
    low, high = half_sample_interval(lambda idx: frechet_distance(features[idx], reference), 96)
    assert low < full < high
    low_rep, _ = bootstrap_interval(lambda idx: frechet_distance(features[idx], reference), 96)
    assert low_rep > low
    with pytest.raises(ValueError, match="at least 4 items"):
        half_sample_interval(lambda idx: 0.0, 3)


def test_psnr_per_video_is_what_the_mean_averages():
    gen = torch.Generator().manual_seed(3)
    ref = torch.rand(5, 3, 2, 4, 4, generator=gen) * 2 - 1
    out = ref + 0.05 * torch.randn(ref.shape, generator=gen)
    per_video = psnr_per_video(out, ref)
    for i in range(5):
        mse = float(((out[i].double() - ref[i].double()) ** 2).mean())
        assert float(per_video[i]) == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-12)
    assert psnr(out, ref) == pytest.approx(float(per_video.mean()), rel=1e-12)


@pytest.fixture(scope="module")
def videos_and_net():
    data = ProceduralVideos(8, frames=4, size=12)
    return data, train_feature_net(data, seed=0, steps=150)


def test_feature_net_is_deterministic_and_cached(tmp_path, videos_and_net):
    data, _ = videos_and_net
    cache = tmp_path / "net.safetensors"
    first = feature_net(data, seed=5, cache=cache, steps=20)
    again = train_feature_net(data, seed=5, steps=20)
    videos = data.videos(torch.arange(24))
    assert torch.equal(video_features(first, videos), video_features(again, videos))
    stamp = cache.stat().st_mtime_ns
    cached = feature_net(data, seed=5, cache=cache, steps=20)  # read back, not retrained
    assert cache.stat().st_mtime_ns == stamp
    assert torch.equal(video_features(cached, videos), video_features(first, videos))
    other = feature_net(data, seed=6, cache=cache, steps=20)  # another seed retrains
    assert not torch.equal(video_features(other, videos), video_features(first, videos))


def test_learned_fd_tells_held_out_data_from_degraded_videos(videos_and_net):
    data, net = videos_and_net
    ids = torch.arange(96)
    real = video_features(net, data.videos(ids % data.num_prompts + data.num_prompts * 10**6
                                           + 12 * ids))
    held_out = data.videos(HELD_OUT_OFFSET - HELD_OUT_OFFSET % 12 + ids)
    floor = frechet_distance(video_features(net, held_out), real)
    blurred = torch.nn.functional.avg_pool3d(held_out, (1, 3, 3), 1, (0, 1, 1))
    frozen = held_out[:, :, :1].expand_as(held_out).contiguous()  # no motion
    shapes, motions = data.prompt_labels(ids % data.num_prompts)
    wrong_shape = data.videos(ids + 4)  # same motions, every shape swapped
    assert bool((data.prompt_labels((ids + 4) % data.num_prompts)[0] != shapes).all())
    assert bool((data.prompt_labels((ids + 4) % data.num_prompts)[1] == motions).all())
    for name, videos in (("blurred", blurred), ("frozen", frozen)):
        assert frechet_distance(video_features(net, videos), real) > 3 * floor, name
    # The features see shape: a set with the prompt's shape swapped is far from the real set
    # paired video by video (same motion), while its own distribution is the data's.
    swapped = video_features(net, wrong_shape)
    own = video_features(net, held_out)
    assert float((swapped - real).norm(dim=1).mean()) > 1.5 * float((own - real).norm(dim=1)
                                                                     .mean())


def test_ceiling_perturbation_scales_every_weight():
    model = torch.nn.Linear(64, 64)
    noisy = perturbed(model, 0.01, seed=0)
    ratio = (noisy.weight / model.weight).detach()
    assert float((ratio - 1).std()) == pytest.approx(0.01, rel=0.1)
    assert torch.equal(perturbed(model, 0.01, seed=0).weight, noisy.weight)
    assert not torch.equal(model.weight, noisy.weight)
