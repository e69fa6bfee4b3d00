"""The band-amplitude form of the frequency loss (issue 31): its PyTorch reference against a
float64 DFT written out with explicit matrices and bins assigned one by one, its gradient,
what it sees (amplitude, not phase) and its place in the stage objective and configuration."""

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
from builders import micro_run, random_dit, with_random_stages

from gpd_kernels.reference import band_amplitude_loss_reference, spectral_bands
from gpd_model import CFG, DiTDenoiser
from gpd_train.config.chains import StageId
from gpd_train.config.load import load_config
from gpd_train.data.procedural import ProceduralVideos
from gpd_train.errors import ConfigError
from gpd_train.eval.detail_metric import BAND_EDGES
from gpd_train.eval.metrics import spectral_radius
from gpd_train.train.builders import build_distill
from gpd_train.train.lanes import LaneBatch
from gpd_train.train.objectives import GuidanceRange, OnlineDistillation, StageGrid

# Non-powers of two, size-1 axes, a single bin, and more frames than temporal bands.
SHAPES = [(2, 3, 4, 16, 16), (1, 2, 5, 7, 9), (1, 1, 1, 1, 1), (2, 1, 3, 1, 6),
          (1, 2, 6, 10, 1), (1, 1, 7, 12, 5)]


def _dft(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(k, k) / n) / math.sqrt(n)


def _frequency(k: int, n: int) -> float:
    return min(k, n - k) / (n / 2)


def _band(kt: int, kh: int, kw: int, t: int, h: int, w: int) -> tuple[int, int]:
    """(temporal band, spatial ring) of one bin, from the definitions in words."""
    f_t = _frequency(kt, t)
    temporal = 0 if f_t == 0 else (1 if f_t <= 0.5 else 2)
    radius = math.sqrt((_frequency(kh, h) ** 2 + _frequency(kw, w) ** 2) / 2)
    ring = next(i for i, edge in enumerate((0.25, 0.5, 0.75, 1.0)) if radius <= edge + 1e-12)
    return temporal, ring


def loss_written_out(pred: torch.Tensor, target: torch.Tensor) -> float:
    """sum over samples, channels and bands of (||P_band|| - ||Q_band||)^2 / numel."""
    b, c, t, h, w = pred.shape
    spectra = [torch.einsum("bcxyz,tx,hy,wz->bcthw", x.double().to(torch.complex128),
                            _dft(t), _dft(h), _dft(w)) for x in (pred, target)]
    energy = [{}, {}]
    for kt in range(t):
        for kh in range(h):
            for kw in range(w):
                key = _band(kt, kh, kw, t, h, w)
                for side, spectrum in enumerate(spectra):
                    power = spectrum[:, :, kt, kh, kw].abs().square()
                    energy[side][key] = energy[side].get(key, 0) + power
    total = sum(float((energy[0][key].sqrt() - energy[1][key].sqrt()).square().sum())
                for key in energy[0])
    return total / pred.numel()


def _pair(shape, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=generator, dtype=torch.float64)
    target = 1.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    return pred.to(dtype), target.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_a_float64_dft_written_out(shape):
    pred, target = _pair(shape, seed=sum(shape))
    expected = loss_written_out(pred, target)
    got = band_amplitude_loss_reference(pred, target)
    assert got.dtype == torch.float64 and got.shape == ()
    assert math.isclose(got.item(), expected, rel_tol=1e-10)
    got32 = band_amplitude_loss_reference(pred.float(), target.float())
    assert got32.dtype == torch.float32
    assert math.isclose(got32.item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("shape", [(1, 2, 3, 4, 5), (2, 1, 1, 3, 1), (1, 1, 4, 2, 6)])
def test_reference_gradcheck_float64(shape):
    pred, target = _pair(shape, seed=7)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    assert torch.autograd.gradcheck(band_amplitude_loss_reference, (pred, target))


@pytest.mark.parametrize("shape", [(1, 1, 4, 16, 16), (1, 1, 3, 9, 1), (1, 1, 5, 1, 1)])
def test_bands_are_the_detail_metrics_rings_by_temporal_band(shape):
    t, h, w = shape[2:]
    band, count = spectral_bands(t, h, w)
    radius = spectral_radius(h, w)
    rings = sum((radius > edge).long() for edge in BAND_EDGES[1:-1])  # the metric's ring
    for kt in range(t):
        temporal = _band(kt, 0, 0, t, h, w)[0]
        bins = band[kt]
        for ring in rings.unique():
            # one band per (temporal band, ring), and no two of them share a number
            assert bins[rings == ring].unique().numel() == 1, (temporal, ring)
    keys = {_band(kt, kh, kw, t, h, w) for kt in range(t) for kh in range(h) for kw in range(w)}
    assert count == len(keys) == band.unique().numel()


def test_it_sees_amplitude_not_phase():
    """A target shifted in time and space has the prediction's band amplitudes: loss 0 while
    the MSE is large; and the loss is never above the MSE (per band, | ||P|| - ||Q|| | is at
    most ||P - Q||)."""
    pred, target = _pair((2, 3, 6, 10, 12), seed=3)
    shifted = torch.roll(pred, shifts=(2, 3, -4), dims=(2, 3, 4))
    assert band_amplitude_loss_reference(pred, shifted).item() < 1e-12
    assert (pred - shifted).square().mean().item() > 1.0
    assert band_amplitude_loss_reference(pred, target) <= (pred - target).square().mean()


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A 3-tap [1, 2, 1] / 4 blur along H and W (circular)."""
    for dim in (3, 4):
        x = (torch.roll(x, 1, dim) + 2 * x + torch.roll(x, -1, dim)) / 4
    return x


def test_its_gradient_restores_the_amplitude_a_blur_took():
    """Against a sharp target, a blurred prediction's gradient step raises its outer ring's
    amplitude by a share of what the blur took; it rescales the prediction's own content
    there (the gradient is parallel to it in each band)."""
    _, target = _pair((1, 1, 4, 16, 16), seed=5)
    pred = _blur(target).requires_grad_(True)
    band, count = spectral_bands(4, 16, 16)
    outer = band == band.max()  # the finest ring at the highest temporal band

    def outer_amplitude(x):
        return torch.fft.fftn(x, dim=(2, 3, 4), norm="ortho")[0, 0][outer].abs().norm()

    band_amplitude_loss_reference(pred, target).backward()
    spectrum = torch.fft.fftn(pred.detach(), dim=(2, 3, 4), norm="ortho")[0, 0][outer]
    step = torch.fft.fftn(pred.grad, dim=(2, 3, 4), norm="ortho")[0, 0][outer]
    cosine = (spectrum.conj() * step).sum().real / (spectrum.norm() * step.norm())
    assert cosine.item() == pytest.approx(-1.0, abs=1e-9)  # -grad points along the content
    before, wanted = outer_amplitude(pred.detach()), outer_amplitude(target)
    assert before < 0.5 * wanted  # the blur took more than half of it
    after = outer_amplitude(pred.detach() - 0.25 * pred.numel() * pred.grad)
    # a step of 1/4 of the way (the gradient is 2/numel (1 - ||Q|| / ||P||) P per band)
    assert float(after - before) == pytest.approx(0.5 * float(wanted - before), rel=1e-9)


def test_a_band_without_energy_gets_a_finite_gradient():
    """sqrt's gradient is infinite at 0: a prediction with an empty band gets 0 there."""
    pred = torch.zeros(1, 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64)
    loss = band_amplitude_loss_reference(pred, target)
    loss.backward()
    assert loss.item() == pytest.approx(target.square().mean().item())
    assert torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize("pred_shape, target_shape, message", [
    ((1, 2, 3, 4, 5), (1, 2, 3, 4, 6), "target: expected shape (1, 2, 3, 4, 5)"),
    ((2, 3, 4, 5), (2, 3, 4, 5), "pred: expected a 5-D tensor [B, C, T, H, W], got shape"),
    ((0, 2, 3, 4, 5), (0, 2, 3, 4, 5), "pred: expected a non-empty tensor"),
])
def test_bad_inputs_are_refused_in_one_line(pred_shape, target_shape, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("]", r"\]")) as caught:
        band_amplitude_loss_reference(torch.zeros(pred_shape), torch.zeros(target_shape))
    assert "\n" not in str(caught.value)


def test_the_stage_option_is_read_and_checked():
    assert load_config(None, {}).chain("gpd").freq_form == "fourier_mse"  # the paper's
    config = load_config(None, {"distill.freq_form": "band_amplitude"})
    assert config.chain("gpd").freq_form == "band_amplitude"
    with pytest.raises(ConfigError, match=r"distill.freq_form must be one of \('fourier_mse', "
                       r"'band_amplitude'\), got 'blur'"):
        load_config(None, {"distill.freq_form": "blur"})


def test_the_objective_matches_the_clean_predictions_band_amplitudes():
    """The stage's term is the band form of x / sigma - u (the clean sample x - sigma u in
    velocity units) for the student and the target, not of the velocities."""
    torch.manual_seed(0)
    data = ProceduralVideos(32, frames=4, size=8, seed=1)  # the tiny preset's text width
    teacher, student = DiTDenoiser(random_dit(4)), DiTDenoiser(random_dit(5))
    grid = StageGrid(4, 3.0, 2, torch.device("cpu"))
    objective = OnlineDistillation(
        student=student, teacher=CFG(teacher, data.negative),
        data=data, generator=torch.Generator().manual_seed(0), grid=grid,
        guidance=GuidanceRange(2.0, 2.0), source="teacher", batch_size=4, freq_weight=3.0,
        freq_params={}, device=torch.device("cpu"), precision="fp32",
        freq_form="band_amplitude")
    inputs = objective.prepare(0)
    loss, extras, _ = objective.forward(inputs)
    batch = LaneBatch.from_inputs(inputs)
    with torch.no_grad():
        u_star = objective._target(batch)
        u_student = objective._student_velocity(batch)
    sigma = grid.student[batch.index].reshape(-1, 1, 1, 1, 1)
    x0_student, x0_star = batch.x - sigma * u_student, batch.x - sigma * u_star
    want = band_amplitude_loss_reference(x0_student / sigma, x0_star / sigma)
    assert extras["freq"].item() == pytest.approx(want.item(), rel=1e-4)
    assert loss.item() == pytest.approx((extras["mse"] + 3.0 * extras["freq"]).item(), rel=1e-6)
    velocity_form = band_amplitude_loss_reference(u_student, u_star)
    assert not math.isclose(extras["freq"].item(), velocity_form.item(), rel_tol=1e-2)
    # The term runs through the fused op: its gradient w.r.t. the student's velocity is the
    # reference's (float64) within float tolerance.
    leaf = u_student.clone().requires_grad_(True)
    (fused,) = torch.autograd.grad(objective._freq_loss(batch, leaf, u_star), leaf)
    leaf64 = u_student.double().requires_grad_(True)
    scaled = batch.x.double() / sigma.double()
    (expected,) = torch.autograd.grad(
        band_amplitude_loss_reference(scaled - leaf64, scaled - u_star.double()), leaf64)
    assert ((fused.double() - expected).norm() / expected.norm()).item() < 1e-4


@pytest.mark.parametrize("form", ["fourier_mse", "band_amplitude"])
def test_the_diagnosis_measures_either_form(tmp_path, capsys, form):
    """benchmarks/freq_diagnosis.py on a micro stage (its numbers are in docs/results.md)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        diagnosis = importlib.import_module("freq_diagnosis")
    finally:
        sys.path.pop(0)
    run = micro_run(tmp_path)
    with_random_stages(run, "gpd", 2)
    objective = build_distill(run, StageId("gpd", 3)).objective
    diagnosis.diagnose(objective, 2, 1.0, {"alpha_s": 4.0, "alpha_t": 1.0, "gamma": 2.0}, form)
    out = capsys.readouterr().out
    term = "frequency excess" if form == "fourier_mse" else "band-amplitude term"
    assert f"{term} x weight 1" in out and "cosine(MSE gradient, whole loss's)" in out
    assert ("clean-prediction band amplitude" in out) == (form == "band_amplitude")
