"""Frequency loss: Triton kernels and public API against the float64 torch.fft reference.

Tolerances: on the CPU the Triton interpreter computes every dot in full fp32, so the
kernel agrees with the float64 reference to fp32 rounding (rtol 1e-5). bf16 inputs are
upcast exactly before the difference is taken, so they get the same tolerance: the
oracle sees the same bf16 values in float64. On CUDA the dots run in tf32 (10-bit
mantissa on the alpha-weighted terms only), hence the looser GPU tolerance.
"""

import math

import pytest
import torch

from gpd_kernels import FrequencyLoss, freq_loss
from gpd_kernels.freq_loss import axis_operator, freq_loss_triton, slabs_fitting_in
from gpd_kernels.reference import axis_frequency, freq_loss_grad_reference, freq_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 2e-3 if DEVICE == "cuda" else 1e-5

# Awkward shapes: Wan 480p latent planes (21x60x104, one whole-plane tile per item),
# odd and prime sizes, size-1 axes, a 720p-like plane (90x160: row blocks with the H
# term in slices, A_W in slices), and clips past the resident A_T (T 130: T_PAD 256).
# With 3 persistent programs on the CPU, a program takes from 1 to 44 plane items.
SHAPES = [
    (1, 1, 21, 60, 104),
    (1, 1, 2, 90, 160),
    (1, 2, 40, 5, 3),
    (1, 1, 130, 3, 5),
    (2, 3, 5, 7, 9),
    (1, 2, 1, 17, 33),
    (2, 1, 6, 1, 20),
    (1, 1, 3, 16, 1),
    (1, 2, 1, 1, 1),
]
LOSS_PARAMS = [(1.0, 1.0, 1.0), (0.8, 2.5, 0.5), (3.0, 0.0, 2.0), (1.0, 1.0, 0.0)]


def _inputs(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=generator, dtype=torch.float64)
    target = torch.randn(shape, generator=generator, dtype=torch.float64)
    return pred.to(dtype), target.to(dtype)


def _relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_triton_matches_float64_reference(index, dtype):
    shape, params = SHAPES[index], LOSS_PARAMS[index % len(LOSS_PARAMS)]
    pred, target = _inputs(shape, dtype, seed=2 * index + (dtype == torch.bfloat16))
    loss, grad = freq_loss_triton(pred.to(DEVICE), target.to(DEVICE), *params, need_grad=True)
    loss_ref, grad_ref = freq_loss_grad_reference(pred.double(), target.double(), *params)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == torch.float32 and grad.shape == pred.shape
    assert math.isclose(loss.item(), loss_ref.item(), rel_tol=RTOL)
    assert _relative_error(grad.cpu(), grad_ref) < RTOL


@pytest.mark.parametrize("params", LOSS_PARAMS)
def test_triton_all_weight_settings(params):
    pred, target = _inputs((2, 2, 4, 12, 18), torch.float32, seed=7)
    loss, grad = freq_loss_triton(pred.to(DEVICE), target.to(DEVICE), *params, need_grad=True)
    loss_ref, grad_ref = freq_loss_grad_reference(pred.double(), target.double(), *params)
    assert math.isclose(loss.item(), loss_ref.item(), rel_tol=RTOL)
    assert _relative_error(grad.cpu(), grad_ref) < RTOL


def test_triton_without_grad_returns_empty_grad_and_same_loss():
    pred, target = _inputs((1, 2, 3, 20, 24), torch.float32, seed=3)
    with_grad, _ = freq_loss_triton(pred.to(DEVICE), target.to(DEVICE), 1.0, 1.0, 1.0, True)
    loss, grad = freq_loss_triton(pred.to(DEVICE), target.to(DEVICE), 1.0, 1.0, 1.0, False)
    assert grad.numel() == 0
    assert math.isclose(loss.item(), with_grad.item(), rel_tol=1e-6)


@pytest.mark.parametrize("slabs_per_launch", [1, 2, 4])
def test_triton_launch_groups_give_the_same_result(slabs_per_launch):
    pred, target = _inputs((5, 1, 3, 9, 17), torch.bfloat16, seed=21)
    pred, target = pred.to(DEVICE), target.to(DEVICE)
    whole = freq_loss_triton(pred, target, 0.6, 1.4, 1.0, True)
    grouped = freq_loss_triton(pred, target, 0.6, 1.4, 1.0, True, slabs_per_launch)
    for got, expected in zip(grouped, whole, strict=True):  # same partials, same order
        assert torch.equal(got, expected)
    bytes_per_slab = (2 + 2 + 4) * 3 * 9 * 17  # bf16 pred, target; float32 grad
    assert slabs_fitting_in(2 * bytes_per_slab + 1, pred, target) == 2


@pytest.mark.parametrize("plane_rows", [16, 32, 64])
def test_triton_plane_row_blocks_match_float64_reference(plane_rows):
    # H 60 -> H_PAD 64: 64 rows is one whole-plane item (A_H @ d from registers); 16 and
    # 32 split each plane into row blocks whose H term streams slices, the last block
    # partial (60 = 3 x 16 + 12 = 32 + 28).
    pred, target = _inputs((2, 1, 3, 60, 40), torch.bfloat16, seed=31)
    loss, grad = freq_loss_triton(pred.to(DEVICE), target.to(DEVICE), 1.3, 0.7, 1.5, True,
                                  plane_rows=plane_rows)
    loss_ref, grad_ref = freq_loss_grad_reference(pred.double(), target.double(), 1.3, 0.7, 1.5)
    assert math.isclose(loss.item(), loss_ref.item(), rel_tol=RTOL)
    assert _relative_error(grad.cpu(), grad_ref) < RTOL


@pytest.mark.parametrize("plane_rows", [8, 48, 128])
def test_triton_plane_rows_must_fit_the_plane(plane_rows):
    pred, target = _inputs((1, 1, 2, 60, 40), torch.float32, seed=32)
    with pytest.raises(ValueError, match=rf"plane_rows: expected a power of two in \[16, 64\], "
                                         rf"got {plane_rows}"):
        freq_loss_triton(pred, target, 1.0, 1.0, 1.0, True, plane_rows=plane_rows)


def test_triton_non_contiguous_inputs_are_handled():
    pred, target = _inputs((2, 3, 4, 10, 12), torch.float32, seed=11)
    # Same values, swapped memory layout: permuted views of contiguous storage.
    pred_view = pred.permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4)
    assert not pred_view.is_contiguous()
    loss, grad = freq_loss_triton(pred_view.to(DEVICE), target.to(DEVICE), 1.0, 0.5, 1.0, True)
    loss_ref, grad_ref = freq_loss_grad_reference(pred.double(), target.double(), 1.0, 0.5, 1.0)
    assert math.isclose(loss.item(), loss_ref.item(), rel_tol=RTOL)
    assert _relative_error(grad.cpu(), grad_ref) < RTOL


@pytest.mark.parametrize("n", [1, 2, 7, 16, 21, 60])
def test_axis_operator_is_the_spectral_weight(n):
    gamma = 1.5
    operator = axis_operator(n, gamma, torch.device("cpu")).double()
    pad = operator.shape[0]
    assert pad >= 16 and pad & (pad - 1) == 0
    assert torch.all(operator[n:] == 0) and torch.all(operator[:, n:] == 0)
    dense = operator[:n, :n]
    dft = torch.fft.fft(torch.eye(n, dtype=torch.float64), norm="ortho")
    expected = dft.conj().T @ torch.diag(axis_frequency(n, torch.float64).pow(gamma) + 0j) @ dft
    torch.testing.assert_close(dense, expected.real, rtol=0, atol=1e-6)


def test_reference_weights_a_single_mode_by_its_frequency():
    # A real cosine along H with odd n puts all energy at k and n - k, both weighted w(k).
    t, h, w, k = 2, 7, 4, 3
    alpha_s, alpha_t, gamma = 1.3, 0.4, 1.7
    rows = torch.cos(2 * math.pi * k * torch.arange(h, dtype=torch.float64) / h)
    pred = rows[None, None, None, :, None].expand(1, 1, t, h, w).clone()
    loss = freq_loss_reference(pred, torch.zeros_like(pred), alpha_s, alpha_t, gamma)
    weight = 1 + alpha_s * (min(k, h - k) / (h / 2)) ** gamma / 2  # f_T(0) = f_W(0) = 0
    assert math.isclose(loss.item(), weight * pred.square().mean().item(), rel_tol=1e-12)


@pytest.mark.parametrize("shape", [(1, 2, 3, 4, 5), (2, 1, 1, 3, 1)])
def test_reference_gradcheck_float64(shape):
    pred, target = _inputs(shape, torch.float64, seed=5)
    pred.requires_grad_()
    target.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, t: freq_loss_reference(p, t, 0.9, 1.7, 1.5), (pred, target))


def test_reference_closed_form_grad_equals_autograd():
    pred, target = _inputs((2, 2, 5, 6, 7), torch.float64, seed=8)
    pred.requires_grad_()
    loss = freq_loss_reference(pred, target, 1.1, 0.6, 2.0)
    (autograd_grad,) = torch.autograd.grad(loss, pred)
    loss_closed, grad_closed = freq_loss_grad_reference(pred.detach(), target, 1.1, 0.6, 2.0)
    torch.testing.assert_close(grad_closed, autograd_grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss_closed, loss.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_zero_alpha_is_mse(gamma):
    pred, target = _inputs((2, 3, 5, 9, 11), torch.float32, seed=9)
    expected = torch.nn.functional.mse_loss(pred.double(), target.double())
    assert math.isclose(freq_loss(pred, target, 0.0, 0.0, gamma).item(), expected.item(),
                        rel_tol=1e-5)
    triton_loss, _ = freq_loss_triton(pred.to(DEVICE), target.to(DEVICE), 0.0, 0.0, gamma, False)
    assert math.isclose(triton_loss.item(), expected.item(), rel_tol=RTOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_public_api_backward_wrt_both_inputs(reduction):
    pred64, target64 = _inputs((2, 2, 3, 5, 6), torch.float64, seed=12)
    pred = pred64.float().requires_grad_()
    target = target64.float().requires_grad_()
    loss = freq_loss(pred, target, 1.2, 0.7, 1.0, reduction=reduction)
    loss.backward(torch.tensor(0.5))
    scale = 0.5 * (pred.numel() if reduction == "sum" else 1)
    ref_pred, ref_target = pred64.clone().requires_grad_(), target64.clone().requires_grad_()
    (freq_loss_reference(ref_pred, ref_target, 1.2, 0.7, 1.0) * scale).backward()
    assert loss.item() == pytest.approx(
        freq_loss_reference(pred64, target64, 1.2, 0.7, 1.0).item() * scale / 0.5, rel=1e-5)
    assert _relative_error(pred.grad, ref_pred.grad) < 1e-5
    assert _relative_error(target.grad, ref_target.grad) < 1e-5


def test_bf16_input_gets_bf16_grad():
    pred, target = _inputs((1, 2, 3, 4, 5), torch.bfloat16, seed=13)
    pred.requires_grad_()
    freq_loss(pred, target).backward()
    _, grad_ref = freq_loss_grad_reference(pred.detach().double(), target.double())
    assert pred.grad.dtype == torch.bfloat16
    torch.testing.assert_close(pred.grad.double(), grad_ref, rtol=1e-2, atol=1e-6)


def test_no_grad_call_then_backward_recomputes_the_gradient():
    pred, target = _inputs((1, 1, 2, 3, 4), torch.float32, seed=14)
    pred.requires_grad_()
    loss, grad = torch.ops.gpd.freq_loss_fwd(pred, target, 1.0, 1.0, 1.0, False)
    assert grad.numel() == 0
    loss.backward()
    _, grad_ref = freq_loss_grad_reference(pred.detach().double(), target.double())
    assert _relative_error(pred.grad, grad_ref) < 1e-5


def test_module_matches_function_and_validates():
    pred, target = _inputs((1, 2, 2, 6, 8), torch.float32, seed=15)
    module = FrequencyLoss(alpha_s=2.0, alpha_t=0.5, gamma=1.5, reduction="sum")
    assert module(pred, target).item() == pytest.approx(
        freq_loss(pred, target, 2.0, 0.5, 1.5, reduction="sum").item(), rel=1e-6)
    assert "alpha_s=2.0" in repr(module)
    with pytest.raises(ValueError, match=r"expected one of \('mean', 'sum'\), got 'max'"):
        FrequencyLoss(reduction="max")
    with pytest.raises(ValueError, match="gamma: expected a finite value >= 0, got -1.0"):
        FrequencyLoss(gamma=-1.0)


BAD_INPUTS = [
    (lambda: (torch.randn(1, 2, 3, 4, 5), torch.randn(1, 2, 3, 4, 6)), ValueError,
     r"target: expected shape \(1, 2, 3, 4, 5\) \(that of pred\), got \(1, 2, 3, 4, 6\)"),
    (lambda: (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)), ValueError,
     r"pred: expected a 5-D tensor \[B, C, T, H, W\], got shape \(2, 3, 4, 5\)"),
    (lambda: (torch.ones(1, 1, 2, 2, 2, dtype=torch.int64), torch.ones(1, 1, 2, 2, 2)),
     TypeError,
     r"pred: expected dtype in \(float32, bfloat16, float16, float64\), got torch.int64"),
    (lambda: (torch.randn(1, 0, 2, 2, 2), torch.randn(1, 0, 2, 2, 2)), ValueError,
     r"pred: expected a non-empty tensor, got shape \(1, 0, 2, 2, 2\)"),
    (lambda: (torch.randn(1, 1, 2, 2, 2), [[1.0]]), TypeError,
     "target: expected a torch.Tensor, got list"),
    (lambda: (torch.randn(1, 1, 2, 2, 2), torch.randn(1, 1, 2, 2, 2, device="meta")), ValueError,
     "expected all tensors on one device, got pred on cpu, target on meta"),
]


@pytest.mark.parametrize("make_inputs,error,message", BAD_INPUTS)
@pytest.mark.parametrize("entry", ["public", "triton", "reference"])
def test_bad_inputs_are_refused(make_inputs, error, message, entry):
    pred, target = make_inputs()
    call = {
        "public": lambda: freq_loss(pred, target),
        "triton": lambda: freq_loss_triton(pred, target, 1.0, 1.0, 1.0, True),
        "reference": lambda: freq_loss_reference(pred, target),
    }[entry]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("name,value", [("alpha_s", -0.5), ("alpha_t", float("nan")),
                                        ("gamma", float("inf"))])
def test_bad_weights_are_refused(name, value):
    pred, target = _inputs((1, 1, 2, 2, 2), torch.float32, seed=1)
    params = {"alpha_s": 1.0, "alpha_t": 1.0, "gamma": 1.0, name: value}
    with pytest.raises(ValueError, match=f"{name}: expected a finite value >= 0, got {value}"):
        freq_loss(pred, target, **params)
