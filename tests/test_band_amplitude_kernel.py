"""The fused band-amplitude loss (issue 31): the Triton kernels (on the CPU through
TRITON_INTERPRET=1, set by conftest) and the native CPU op against the float64 torch.fft
reference, loss and gradient, and the public op's autograd for both inputs.

Tolerances: the interpreter and the native op compute in fp32 (bf16 inputs are upcast exactly,
and the oracle reads the same bf16 values in float64), so they agree to fp32 rounding; on CUDA
the dots run in tf32x3 (about fp32; the looser GPU bound is a guess to be checked there).
Interpreter shapes stay tiny (it runs every program in Python).
"""

import math

import pytest
import torch

import gpd_kernels
from gpd_kernels import BandAmplitudeLoss, band_amplitude_loss
from gpd_kernels.band_amplitude_loss import (
    _band_amplitude_loss_cpu,
    band_amplitude_loss_triton,
    real_fourier_basis,
)
from gpd_kernels.reference import (
    band_amplitude_loss_grad_reference,
    band_amplitude_loss_reference,
    band_tables,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RTOL = 1e-4 if DEVICE == "cuda" else 1e-5
NATIVE_RTOL = 1e-5
NATIVE = gpd_kernels.cpu_backend() == "native"

# Powers of two (and bins on a ring edge: 4 x 4 puts radius 0.5 exactly on one), odd sizes,
# a single bin, T = 1, H = 1, W = 1, and more frames than temporal bands.
SHAPES = [(2, 3, 4, 16, 16), (1, 1, 2, 4, 4), (1, 2, 5, 7, 9), (1, 1, 1, 1, 1),
          (2, 1, 1, 6, 5), (1, 2, 3, 1, 9), (1, 1, 6, 10, 1)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _triton(pred, target, need_grad):
    loss, grad = band_amplitude_loss_triton(pred.to(DEVICE), target.to(DEVICE), need_grad)
    return loss.cpu(), grad.cpu()


def _native(pred, target, need_grad):
    if not NATIVE:
        pytest.skip("native library not active")
    return torch.ops.gpd.band_amplitude_loss_fwd(pred, target, need_grad)


BACKENDS = {"triton": (_triton, TRITON_RTOL), "native": (_native, NATIVE_RTOL)}


def _pair(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=generator, dtype=torch.float64)
    target = 1.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    return pred.to(dtype), target.to(dtype)


def _expected(pred, target):
    """float64 loss and d loss / d pred (autograd) of the reference, on the values the kernel
    read."""
    leaf = pred.double().requires_grad_(True)
    loss = band_amplitude_loss_reference(leaf, target.double())
    return loss.detach(), torch.autograd.grad(loss, leaf)[0]


def _relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_gradient_match_float64_fft(shape, dtype, backend):
    run, rtol = BACKENDS[backend]
    pred, target = _pair(shape, DTYPES[dtype], seed=sum(shape) + len(dtype))
    loss, grad = run(pred, target, True)
    loss_ref, grad_ref = _expected(pred, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == torch.float32 and grad.shape == pred.shape
    assert math.isclose(loss.item(), loss_ref.item(), rel_tol=rtol)
    assert _relative_error(grad, grad_ref) < rtol


def test_native_at_the_wan_480p_latent_size():
    """The native op on the size the benchmark times (too slow for the interpreter)."""
    pred, target = _pair((1, 2, 21, 60, 104), torch.bfloat16, seed=480)
    loss, grad = _native(pred, target, True)
    loss_ref, grad_ref = _expected(pred, target)
    assert math.isclose(loss.item(), loss_ref.item(), rel_tol=NATIVE_RTOL)
    assert _relative_error(grad, grad_ref) < NATIVE_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_grad_the_same_loss_and_no_gradient(backend):
    run, _ = BACKENDS[backend]
    pred, target = _pair((1, 2, 3, 5, 6), torch.float32, seed=2)
    with_grad, _ = run(pred, target, True)
    loss, grad = run(pred, target, False)
    assert grad.numel() == 0
    assert loss.item() == with_grad.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shifts", [(0, 0, 0), (1, 2, -3)])
def test_zero_for_a_target_of_the_same_band_amplitudes(backend, shifts):
    """target = pred, or pred rolled in time and space (the same amplitude in every bin):
    loss and gradient vanish to rounding while the MSE does not."""
    run, _ = BACKENDS[backend]
    pred, _ = _pair((2, 2, 4, 6, 7), torch.float32, seed=9)
    target = torch.roll(pred, shifts=shifts, dims=(2, 3, 4))
    loss, grad = run(pred, target, True)
    _, other_grad = run(pred, _pair((2, 2, 4, 6, 7), torch.float32, seed=10)[1], True)
    scale = pred.square().mean().item()
    assert abs(loss.item()) < 1e-6 * scale
    assert grad.norm() < 1e-5 * other_grad.norm()
    if shifts != (0, 0, 0):
        assert (pred - target).square().mean().item() > scale


@pytest.mark.parametrize("shape", [(1, 1, 33, 2, 3), (1, 2, 2, 20, 200)])
def test_triton_sliced_contractions_and_blocks(shape):
    """T 33 (T_PAD 64: two contraction slices of R_T); W 200 (W_PAD 256: eight slices of R_W,
    32-row blocks, two per slab) and H * W 4,000 (sixteen column blocks of the T pass)."""
    pred, target = _pair(shape, torch.float32, seed=sum(shape))
    loss, grad = _triton(pred, target, True)
    loss_ref, grad_ref = _expected(pred, target)
    assert math.isclose(loss.item(), loss_ref.item(), rel_tol=TRITON_RTOL)
    assert _relative_error(grad, grad_ref) < TRITON_RTOL


def test_triton_non_contiguous_inputs():
    pred, target = _pair((2, 3, 3, 5, 6), torch.float32, seed=11)
    view = pred.permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4)
    assert not view.is_contiguous()
    loss, grad = _triton(view, target, True)
    loss_ref, grad_ref = _expected(pred, target)
    assert math.isclose(loss.item(), loss_ref.item(), rel_tol=TRITON_RTOL)
    assert _relative_error(grad, grad_ref) < TRITON_RTOL


@pytest.mark.parametrize("n", [1, 2, 5, 8, 21])
def test_real_fourier_basis_is_orthogonal_and_carries_each_bins_energy(n):
    """R_n R_n^T = I, and per bin pair {k, n - k} the squared coefficients of R_n x sum to
    the pair's |FFT|^2: the identity the kernels rest on."""
    basis = real_fourier_basis(n)
    torch.testing.assert_close(basis @ basis.T, torch.eye(n, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    x = torch.randn(n, dtype=torch.float64)
    coefficients = (basis @ x).square()
    power = torch.fft.fft(x, norm="ortho").abs().square()
    for k in range(n // 2 + 1):
        pair = sorted({k, (n - k) % n})
        assert coefficients[pair].sum().item() == pytest.approx(power[pair].sum().item(),
                                                                rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("shape", [(2, 2, 3, 5, 6), (1, 1, 1, 4, 1)])
def test_closed_form_gradient_reference_is_autograds(shape):
    """The closed form (the reference backend's CPU kernel and the benchmark's baseline)
    against autograd of the reference, float64; an empty band of pred gets 0."""
    pred, target = _pair(shape, torch.float64, seed=14)
    pred[0, 0] = 0  # every band of this slab empty
    loss, grad = band_amplitude_loss_grad_reference(pred, target)
    loss_ref, grad_ref = _expected(pred, target)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-14)
    assert grad.dtype == torch.float64 and torch.equal(grad[0, 0], torch.zeros_like(grad[0, 0]))


def test_band_tables_number_the_reference_bands():
    temporal, ring = band_tables(5, 6, 7)
    assert temporal.tolist() == [0, 1, 2, 2, 1]  # f_T 0, 0.4, 0.8, 0.8, 0.4
    assert ring.shape == (6, 7) and ring[0, 0] == 0 and ring[3, 3] == 3


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_public_op_backward_wrt_both_inputs(reduction):
    """band_amplitude_loss (the op's CPU kernel under autograd; the target's gradient by the
    swapped op) against autograd of the float64 reference, both inputs."""
    pred64, target64 = _pair((2, 2, 3, 5, 6), torch.float64, seed=12)
    pred = pred64.float().requires_grad_()
    target = target64.float().requires_grad_()
    loss = band_amplitude_loss(pred, target, reduction=reduction)
    loss.backward(torch.tensor(0.5))
    scale = 0.5 * (pred.numel() if reduction == "sum" else 1)
    ref_pred, ref_target = pred64.clone().requires_grad_(), target64.clone().requires_grad_()
    reference = band_amplitude_loss_reference(ref_pred, ref_target)
    (reference * scale).backward()
    assert loss.item() == pytest.approx(reference.item() * scale / 0.5, rel=1e-5)
    assert _relative_error(pred.grad, ref_pred.grad) < 1e-5
    assert _relative_error(target.grad, ref_target.grad) < 1e-5


def test_module_and_the_reference_backends_cpu_kernel():
    pred, target = _pair((1, 2, 3, 4, 5), torch.bfloat16, seed=13)
    pred.requires_grad_()
    BandAmplitudeLoss()(pred, target).backward()
    loss_ref, grad_ref = _expected(pred.detach(), target)
    assert pred.grad.dtype == torch.bfloat16
    torch.testing.assert_close(pred.grad.double(), grad_ref, rtol=1e-2, atol=1e-6)
    # The CPU kernel registered when the native library is absent (GPD_DISABLE_NATIVE=1).
    loss, grad = _band_amplitude_loss_cpu(pred.detach(), target, True)
    assert math.isclose(loss.item(), loss_ref.item(), rel_tol=1e-5)
    assert _relative_error(grad, grad_ref) < 1e-5
    assert _band_amplitude_loss_cpu(pred.detach(), target, False)[1].numel() == 0


def test_bad_reduction_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"reduction: expected one of \('mean', 'sum'\), "
                                         r"got 'max'"):
        BandAmplitudeLoss(reduction="max")
