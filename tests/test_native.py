"""The native C++ CPU kernels (libgpd_native) against float64 torch.fft and explicit math.

These run the native backend; they skip when the library was not built (set
GPD_REQUIRE_NATIVE=1 to make that a failure, as CI should). The kernels' own tests cover the
Python reference backend, and test_reference_backend_in_subprocess runs it beside native here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gpd_kernels
from gpd_kernels._native import native_library_path, native_unavailable_reason, schema_mismatches
from gpd_kernels.reference import (
    band_amplitude_loss_reference,
    cfg_euler_step_reference,
    double_step_target_reference,
    freq_loss_grad_reference,
    freq_loss_reference,
)

if gpd_kernels.cpu_backend() != "native":
    reason = f"native library not active: {native_unavailable_reason()}"
    if os.environ.get("GPD_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"GPD_REQUIRE_NATIVE=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)

freq_loss_fwd = torch.ops.gpd.freq_loss_fwd
band_amplitude_loss_fwd = torch.ops.gpd.band_amplitude_loss_fwd
cfg_euler_step = torch.ops.gpd.cfg_euler_step
double_step_target = torch.ops.gpd.double_step_target

SHAPES = {
    "odd": (2, 3, 5, 6, 7),
    "all-size-1": (1, 1, 1, 1, 1),
    "size-1-T-and-W": (1, 2, 1, 7, 1),
    "size-1-H": (2, 1, 4, 1, 9),
    "two-point-axes": (1, 1, 2, 2, 2),
    "wan480p-like": (1, 2, 21, 60, 104),
}
# (alpha_s, alpha_t, gamma): the default weights, plain MSE, spatial or temporal only, and
# gamma = 0 (0^0 = 1 puts the constant weight on the zero frequency too).
PARAMS = [(1.0, 1.0, 1.0), (0.0, 0.0, 1.0), (2.5, 0.0, 0.5), (0.0, 3.0, 2.0), (0.7, 0.3, 0.0)]
INPUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=generator).to(dtype)
    target = torch.randn(shape, generator=generator).to(dtype)
    return pred, target


def _fft_reference(pred, target, params):
    """float64 torch.fft loss and gradient on exactly the values the kernel read."""
    return freq_loss_grad_reference(pred.double(), target.double(), *params)


@pytest.mark.parametrize("params", PARAMS, ids=str)
@pytest.mark.parametrize("dtype_name", INPUT_DTYPES)
@pytest.mark.parametrize("shape_name", SHAPES)
def test_freq_loss_matches_float64_fft(shape_name, dtype_name, params):
    pred, target = _inputs(SHAPES[shape_name], INPUT_DTYPES[dtype_name], seed=len(shape_name))
    loss, grad = freq_loss_fwd(pred, target, *params, True)
    expected_loss, expected_grad = _fft_reference(pred, target, params)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == torch.float32 and grad.shape == pred.shape
    torch.testing.assert_close(loss.double(), expected_loss, rtol=2e-6, atol=0)
    # Gradient entries are O(1/numel): compare relative to the largest one.
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=2e-6 * scale)


def test_freq_loss_without_grad_returns_the_same_loss_and_no_gradient():
    pred, target = _inputs((2, 2, 3, 8, 5), torch.float32, seed=1)
    loss_with, _ = freq_loss_fwd(pred, target, 1.5, 0.5, 1.0, True)
    loss_without, grad = freq_loss_fwd(pred, target, 1.5, 0.5, 1.0, False)
    assert grad.shape == (0,) and grad.dtype == torch.float32
    assert torch.equal(loss_with, loss_without)


OTHER_DTYPES = [(torch.float64, torch.float64), (torch.float16, torch.float16),
                (torch.bfloat16, torch.float32), (torch.float32, torch.float64)]


@pytest.mark.parametrize("dtypes", OTHER_DTYPES, ids=str)
def test_freq_loss_other_and_mixed_dtypes(dtypes):
    generator = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 2, 3, 5, 6, generator=generator).to(dtypes[0])
    target = torch.randn(2, 2, 3, 5, 6, generator=generator).to(dtypes[1])
    loss, grad = freq_loss_fwd(pred, target, 1.0, 0.5, 1.5, True)
    expected_loss, expected_grad = _fft_reference(pred, target, (1.0, 0.5, 1.5))
    assert loss.dtype == grad.dtype == torch.float32  # the op's contract, whatever came in
    torch.testing.assert_close(loss.double(), expected_loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=0,
                               atol=2e-6 * expected_grad.abs().max().item())


def test_freq_loss_non_contiguous_inputs():
    generator = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 3, 7, 6, 5, generator=generator).transpose(2, 4)
    target = torch.randn(2, 3, 5, 6, 14, generator=generator)[..., ::2]
    assert not pred.is_contiguous() and not target.is_contiguous()
    loss, grad = freq_loss_fwd(pred, target, 1.0, 1.0, 1.0, True)
    expected_loss, expected_grad = _fft_reference(pred, target, (1.0, 1.0, 1.0))
    torch.testing.assert_close(loss.double(), expected_loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=0,
                               atol=2e-6 * expected_grad.abs().max().item())


def test_public_freq_loss_autograd_through_native_kernel():
    """gpd_kernels.freq_loss (Python autograd over the native forward) vs autograd of fft."""
    pred, target = _inputs((1, 3, 4, 9, 10), torch.float32, seed=4)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    loss = gpd_kernels.freq_loss(pred, target, alpha_s=2.0, alpha_t=0.5, gamma=1.5,
                                 reduction="sum")
    loss.backward(torch.tensor(0.75))
    pred64 = pred.detach().double().requires_grad_(True)
    target64 = target.detach().double().requires_grad_(True)
    expected = freq_loss_reference(pred64, target64, 2.0, 0.5, 1.5) * pred.numel()
    expected.backward(torch.tensor(0.75, dtype=torch.float64))
    torch.testing.assert_close(loss.detach().double(), expected.detach(), rtol=2e-6, atol=0)
    for got, want in ((pred.grad, pred64.grad), (target.grad, target64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * want.abs().max().item())


def _per_sample(values, like):
    return values.double().reshape((-1,) + (1,) * (like.dim() - 1))


GUIDED_SHAPES = {"4d-odd": (3, 5, 1, 7), "latent": (2, 4, 3, 6, 10), "1d": (5,), "b1": (1, 9)}


def _teacher_outputs(shape, lead_dtype, u_dtype, guided, seed):
    """A leading tensor, u_cond, u_uncond and guidance (None without CFG), and the generator."""
    generator = torch.Generator().manual_seed(seed)
    lead = torch.randn(shape, generator=generator).to(lead_dtype)
    cond = torch.randn(shape, generator=generator).to(u_dtype)
    uncond = torch.randn(shape, generator=generator).to(u_dtype) if guided else None
    guidance = 1 + 5 * torch.rand(shape[0], generator=generator) if guided else None
    return lead, cond, uncond, guidance, generator


def _explicit_velocity(cond, uncond, guidance):
    """float64 CFG combine, written out."""
    if uncond is None:
        return cond.double()
    return uncond.double() + _per_sample(guidance, cond) * (cond.double() - uncond.double())


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("shape_name", GUIDED_SHAPES)
def test_cfg_euler_step_explicit_math(shape_name, guided, x_dtype):
    shape = GUIDED_SHAPES[shape_name]
    x, cond, uncond, guidance, generator = _teacher_outputs(shape, x_dtype, x_dtype, guided, 5)
    sigma_from = torch.rand(shape[0], generator=generator)
    sigma_to = sigma_from * torch.rand(shape[0], generator=generator)
    x_next, g = cfg_euler_step(x, cond, uncond, guidance, sigma_from, sigma_to)
    assert x_next.dtype == x_dtype and g.dtype == torch.float32
    velocity = _explicit_velocity(cond, uncond, guidance)
    step = _per_sample(sigma_to, x) - _per_sample(sigma_from, x)
    torch.testing.assert_close(g.double(), velocity, rtol=1e-6, atol=1e-6)
    # x_next is rounded once, to x's dtype, from the float32 result.
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if x_dtype == torch.float32 else {}
    torch.testing.assert_close(x_next, (x.double() + step * velocity).to(x_dtype), **tolerance)
    # The Python reference (same float32 operation order) agrees to the bit.
    ref_next, ref_g = cfg_euler_step_reference(x, cond, uncond, guidance, sigma_from, sigma_to)
    assert torch.equal(g, ref_g) and torch.equal(x_next, ref_next)


@pytest.mark.parametrize("u_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("shape_name", GUIDED_SHAPES)
def test_double_step_target_explicit_math(shape_name, guided, u_dtype):
    shape = GUIDED_SHAPES[shape_name]
    g1, cond, uncond, guidance, generator = _teacher_outputs(shape, torch.float32, u_dtype,
                                                             guided, 6)
    s_a = 0.5 + 0.5 * torch.rand(shape[0], generator=generator)
    s_b = s_a * (0.5 + 0.4 * torch.rand(shape[0], generator=generator))
    s_c = s_b * 0.5
    u_star = double_step_target(g1, cond, uncond, guidance, s_a, s_b, s_c)
    assert u_star.dtype == torch.float32 and u_star.shape == shape
    g2 = _explicit_velocity(cond, uncond, guidance)
    a, b, c = (_per_sample(s, g1) for s in (s_a, s_b, s_c))
    # One step of u* from s_a lands where the two Euler steps (g1 then g2) land.
    torch.testing.assert_close(u_star.double() * (c - a), (b - a) * g1.double() + (c - b) * g2,
                               rtol=1e-5, atol=1e-6)
    reference = double_step_target_reference(g1, cond, uncond, guidance, s_a, s_b, s_c)
    assert torch.equal(u_star, reference)


def test_guided_ops_mixed_velocity_dtypes_and_float64_scalars():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, generator=generator).bfloat16()
    cond = torch.randn(2, 3, 4, generator=generator)
    uncond = torch.randn(2, 3, 4, generator=generator).half()
    guidance = torch.tensor([2.0, 4.5], dtype=torch.float64)
    sigma_from, sigma_to = torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.25], dtype=torch.float64)
    got = cfg_euler_step(x, cond, uncond, guidance, sigma_from, sigma_to)
    want = cfg_euler_step_reference(x, cond, uncond, guidance, sigma_from, sigma_to)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    got_target = double_step_target(x, cond, uncond, guidance, sigma_from, sigma_to,
                                    torch.tensor([0.7, 0.1]))
    want_target = double_step_target_reference(x, cond, uncond, guidance, sigma_from, sigma_to,
                                               torch.tensor([0.7, 0.1]))
    assert torch.equal(got_target, want_target)


def test_guided_ops_empty_batch():
    x = torch.randn(0, 3)
    x_next, g = cfg_euler_step(x, x, None, None, torch.zeros(0), torch.zeros(0))
    assert x_next.shape == g.shape == (0, 3)
    u_star = double_step_target(x, x, None, None, torch.zeros(0), torch.zeros(0), torch.zeros(0))
    assert u_star.shape == (0, 3)


def _error(fn, *args):
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args)
    return type(info.value), str(info.value)


def _b(*values):
    return torch.tensor(values)


LATENT = (1, 2, 3, 4, 5)
FREQ_BAD = {
    "int-pred": lambda: (torch.ones(LATENT, dtype=torch.int64), torch.randn(LATENT), 1., 1., 1.),
    "int-target": lambda: (torch.randn(LATENT), torch.ones(LATENT, dtype=torch.int32), 1., 1., 1.),
    "rank-4": lambda: (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), 1., 1., 1.),
    "shape-mismatch": lambda: (torch.randn(LATENT), torch.randn(1, 2, 3, 4, 6), 1., 1., 1.),
    "negative-alpha_s": lambda: (torch.randn(LATENT), torch.randn(LATENT), -1.0, 1., 1.),
    "inf-alpha_t": lambda: (torch.randn(LATENT), torch.randn(LATENT), 1., float("inf"), 1.),
    "nan-gamma": lambda: (torch.randn(LATENT), torch.randn(LATENT), 1., 1., float("nan")),
    "tiny-negative-gamma": lambda: (torch.randn(LATENT), torch.randn(LATENT), 1., 1., -2.5e-05),
    "large-negative-alpha_s": lambda: (torch.randn(LATENT), torch.randn(LATENT), -1e20, 1., 1.),
}
BAND_BAD = {
    "band-int-pred": lambda: (torch.ones(LATENT, dtype=torch.int64), torch.randn(LATENT)),
    "band-rank-4": lambda: (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)),
    "band-shape-mismatch": lambda: (torch.randn(LATENT), torch.randn(1, 2, 3, 4, 6)),
    "band-empty": lambda: (torch.randn(0, 2, 3, 4, 5), torch.randn(0, 2, 3, 4, 5)),
}
X = (2, 3)
CFG_BAD = {
    "0-D-x": lambda: (torch.tensor(1.0), torch.tensor(1.0), None, None, _b(0.5), _b(0.2)),
    "int-x": lambda: (torch.ones(X, dtype=torch.int64), torch.randn(X), None, None,
                      _b(.5, .5), _b(.2, .2)),
    "u_cond-shape": lambda: (torch.randn(X), torch.randn(2, 4), None, None, _b(.5, .5),
                             _b(.2, .2)),
    "uncond-without-guidance": lambda: (torch.randn(X), torch.randn(X), torch.randn(X), None,
                                        _b(.5, .5), _b(.2, .2)),
    "guidance-without-uncond": lambda: (torch.randn(X), torch.randn(X), None, _b(3., 3.),
                                        _b(.5, .5), _b(.2, .2)),
    "int-uncond": lambda: (torch.randn(X), torch.randn(X), torch.ones(X, dtype=torch.int8),
                           _b(3., 3.), _b(.5, .5), _b(.2, .2)),
    "sigma-shape": lambda: (torch.randn(X), torch.randn(X), None, None, _b(.5, .5, .5),
                            _b(.2, .2)),
    "sigma-int": lambda: (torch.randn(X), torch.randn(X), None, None, _b(.5, .5),
                          torch.tensor([0, 0])),
    "guidance-2d": lambda: (torch.randn(X), torch.randn(X), torch.randn(X), torch.ones(2, 1),
                            _b(.5, .5), _b(.2, .2)),
}
TARGET_BAD = {
    "int-g1": lambda: (torch.ones(X, dtype=torch.int64), torch.randn(X), None, None,
                       _b(.9, .9), _b(.5, .5), _b(.2, .2)),
    "s_c-shape": lambda: (torch.randn(X), torch.randn(X), None, None, _b(.9, .9), _b(.5, .5),
                          _b(.2)),
    "u_uncond-shape": lambda: (torch.randn(X), torch.randn(X), torch.randn(3, 2), _b(2., 2.),
                               _b(.9, .9), _b(.5, .5), _b(.2, .2)),
}
BAD_CASES = [(freq_loss_fwd, freq_loss_reference, name, make) for name, make in FREQ_BAD.items()]
BAD_CASES += [(band_amplitude_loss_fwd, band_amplitude_loss_reference, name, make)
              for name, make in BAND_BAD.items()]
BAD_CASES += [(cfg_euler_step, cfg_euler_step_reference, name, make)
              for name, make in CFG_BAD.items()]
BAD_CASES += [(double_step_target, double_step_target_reference, name, make)
              for name, make in TARGET_BAD.items()]


@pytest.mark.parametrize("native_op, python_path, name, make_args", BAD_CASES,
                         ids=[case[2] for case in BAD_CASES])
def test_bad_input_same_error_as_python_path(native_op, python_path, name, make_args):
    args = make_args()
    native_args = args + (True,) if native_op in (freq_loss_fwd, band_amplitude_loss_fwd) else args
    native_type, native_message = _error(native_op, *native_args)
    python_type, python_message = _error(python_path, *args)
    assert (native_type, native_message) == (python_type, python_message)


def test_native_library_owns_the_schemas_from_schemas_txt():
    assert native_library_path().exists()
    assert schema_mismatches() == []
    for name in ("freq_loss_fwd", "cfg_euler_step", "double_step_target"):
        assert getattr(torch.ops.gpd, name).default._schema.name == f"gpd::{name}"


def test_reference_backend_in_subprocess(tmp_path):
    """The same op call with GPD_DISABLE_NATIVE=1 runs the Python reference: results agree."""
    pred, target = _inputs((2, 2, 3, 6, 5), torch.float32, seed=8)
    native_loss, native_grad = freq_loss_fwd(pred, target, 1.0, 0.5, 2.0, True)
    script = (
        "import sys, torch, gpd_kernels\n"
        "assert gpd_kernels.cpu_backend() == 'reference', gpd_kernels.cpu_backend()\n"
        "pred, target = torch.load(sys.argv[1])\n"
        "torch.save(torch.ops.gpd.freq_loss_fwd(pred, target, 1.0, 0.5, 2.0, True), sys.argv[2])\n"
    )
    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save((pred, target), inputs)
    env = dict(os.environ, GPD_DISABLE_NATIVE="1")
    subprocess.run([sys.executable, "-c", script, str(inputs), str(outputs)], env=env,
                   check=True, timeout=120)
    reference_loss, reference_grad = torch.load(outputs)
    torch.testing.assert_close(native_loss, reference_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(native_grad, reference_grad, rtol=0,
                               atol=1e-5 * reference_grad.abs().max().item())
