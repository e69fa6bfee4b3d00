"""Teacher double-step ops: Triton kernels and public API against float64 formulas.

Tolerances: g and u* are fp32 math (rtol 1e-5 against float64 on the same input values);
x_next is x + step * g rounded once to x's dtype, so a bf16 x_next is within half an ulp
(rtol 2^-8) of the float64 value, and bit-equal to the nearest bf16 of the exact value,
on a GPU and under the Triton interpreter alike (gpd_kernels.double_step, "Rounding").
"""

import pytest
import torch

from gpd_kernels import cfg_euler_step, double_step_target
from gpd_kernels.double_step import cfg_euler_step_triton, double_step_target_triton
from gpd_kernels.reference import cfg_euler_step_reference, double_step_target_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 4, 5, 6, 7), (1, 16, 3, 8, 8), (2, 1), (5, 3, 1, 1, 700)]
FP32_TOL = {"rtol": 1e-5, "atol": 1e-6}
BF16_OUTPUT_TOL = {"rtol": 2 ** -8 + 1e-5, "atol": 1e-6}


def _random(shape, dtype, generator):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def _scalars(batch, generator, count):
    """Decreasing sigmas per sample (distinct across the batch) and guidance in [1, 7)."""
    sigmas = torch.rand(batch, count, generator=generator, dtype=torch.float64)
    sigmas = sigmas.sort(dim=1, descending=True).values
    guidance = 1 + 6 * torch.rand(batch, generator=generator, dtype=torch.float64)
    return [sigmas[:, i].float() for i in range(count)], guidance.float()


def _expand(scalar, like):
    return scalar.double().reshape((-1,) + (1,) * (like.dim() - 1))


def _guided64(u_cond, u_uncond, guidance):
    if u_uncond is None:
        return u_cond.double()
    return u_uncond.double() + _expand(guidance, u_cond) * (u_cond.double() - u_uncond.double())


def _to_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_euler_step_matches_float64(shape, dtype, guided):
    generator = torch.Generator().manual_seed(SHAPES.index(shape))
    x, u_cond, u_uncond = (_random(shape, dtype, generator) for _ in range(3))
    (sigma_from, sigma_to), guidance = _scalars(shape[0], generator, 2)
    if not guided:
        u_uncond = guidance = None
    args = (x, u_cond, u_uncond, guidance, sigma_from, sigma_to)
    x_next, g = cfg_euler_step_triton(*_to_device(*args))
    g64 = _guided64(u_cond, u_uncond, guidance)
    x_next64 = x.double() + (_expand(sigma_to, x) - _expand(sigma_from, x)) * g64
    assert g.dtype == torch.float32 and x_next.dtype == dtype
    torch.testing.assert_close(g.cpu().double(), g64, **FP32_TOL)
    output_tol = BF16_OUTPUT_TOL if dtype == torch.bfloat16 else FP32_TOL
    torch.testing.assert_close(x_next.cpu().double(), x_next64, **output_tol)
    ref_x_next, ref_g = cfg_euler_step_reference(*args)
    torch.testing.assert_close(ref_g.double(), g64, **FP32_TOL)
    torch.testing.assert_close(ref_x_next.double(), x_next64, **output_tol)


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_double_step_target_matches_float64(shape, dtype, guided):
    generator = torch.Generator().manual_seed(10 + SHAPES.index(shape))
    g1, u_cond, u_uncond = (_random(shape, dtype, generator) for _ in range(3))
    (s_a, s_b, s_c), guidance = _scalars(shape[0], generator, 3)
    if not guided:
        u_uncond = guidance = None
    args = (g1, u_cond, u_uncond, guidance, s_a, s_b, s_c)
    target = double_step_target_triton(*_to_device(*args))
    a, b, c = (_expand(s, g1) for s in (s_a, s_b, s_c))
    g2 = _guided64(u_cond, u_uncond, guidance)
    expected = ((b - a) * g1.double() + (c - b) * g2) / (c - a)
    assert target.dtype == torch.float32 and target.shape == shape
    # (c - a) can be small for random sigmas, amplifying fp32 rounding: relative to scale.
    tol = {"rtol": 1e-5, "atol": 1e-6 * expected.abs().max().item()}
    torch.testing.assert_close(target.cpu().double(), expected, **tol)
    torch.testing.assert_close(double_step_target_reference(*args).double(), expected, **tol)


def _nearest(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The representable value of `dtype` nearest to float64 `value` (ties to even), picked
    among the cast and its two bit-neighbours by float64 distance: independent of how
    torch or the kernel round."""
    bits = value.to(dtype).view(torch.int16)
    candidates = torch.stack([bits - 1, bits, bits + 1]).view(dtype)
    distance = (candidates.double() - value).abs()
    ties_to_even = (candidates.view(torch.int16) % 2 != 0).int()
    score = torch.where(distance == distance.min(0).values, 0, 2) + ties_to_even
    return candidates.gather(0, score.argmin(0, keepdim=True))[0]


# Awkward sizes: per-sample sizes below, at and just past the kernel's 2048 block, a
# single element, a size-1 middle axis.
ROUNDING_SHAPES = [(3, 5, 7, 11), (2, 2049), (1, 1), (4, 1, 2048), (5, 3, 1, 1, 700)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("shape", ROUNDING_SHAPES)
def test_x_next_is_rounded_once_like_the_reference(shape, guided, dtype):
    """Issue 14: x_next bit-equal between kernel and reference, and to the exact
    x + step * g rounded once (bf16 inputs put many exact sums just past a midpoint, where
    rounding to fp32 first and then to bf16 lands one ulp off); g bit-equal too."""
    generator = torch.Generator().manual_seed(100 + ROUNDING_SHAPES.index(shape))
    x, u_cond, u_uncond = (_random(shape, torch.bfloat16, generator) for _ in range(3))
    x = x.to(dtype)
    (sigma_from, sigma_to), guidance = _scalars(shape[0], generator, 2)
    if not guided:
        u_uncond = guidance = None
    args = (x, u_cond, u_uncond, guidance, sigma_from, sigma_to)
    x_next, g = (t.cpu() for t in cfg_euler_step_triton(*_to_device(*args)))
    ref_x_next, ref_g = cfg_euler_step_reference(*args)
    assert torch.equal(g, ref_g)
    assert torch.equal(x_next, ref_x_next)
    step = (_expand(sigma_to, x) - _expand(sigma_from, x)).float().double()
    assert torch.equal(x_next, _nearest(x.double() + step * g.double(), dtype))


def test_x_next_keeps_nan_and_inf():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0]], dtype=torch.bfloat16)
    u = torch.zeros_like(x)
    sigma = torch.tensor([0.5])
    x_next, _ = cfg_euler_step_triton(*_to_device(x, u, None, None, sigma, sigma / 2))
    assert torch.equal(x_next.cpu().isnan(), x.isnan())
    assert torch.equal(x_next.cpu()[0, 1:], x[0, 1:])


def _toy_teacher(x, sigma, shift):
    """A fixed nonlinear velocity field standing in for a network output."""
    s = _expand(sigma, x).float()
    return torch.tanh(x * (1 + s)) + shift * s


@pytest.mark.parametrize("guided", [True, False])
def test_target_reproduces_two_euler_steps(guided):
    """x_a + (s_c - s_a) u* equals the teacher's two guided Euler steps x_c."""
    generator = torch.Generator().manual_seed(21)
    shape = (3, 4, 2, 6, 10)
    x_a = _random(shape, torch.float32, generator)
    (s_a, s_b, s_c), guidance = _scalars(shape[0], generator, 3)
    if not guided:
        guidance = None

    def teacher(x, sigma):
        cond = _toy_teacher(x, sigma, 0.3)
        return (cond, _toy_teacher(x, sigma, -0.2)) if guided else (cond, None)

    cond_a, uncond_a = teacher(x_a, s_a)
    x_b, g1 = cfg_euler_step(*_to_device(x_a, cond_a, uncond_a, guidance, s_a, s_b))
    cond_b, uncond_b = teacher(x_b.cpu(), s_b)
    u_star = double_step_target(*_to_device(g1, cond_b, uncond_b, guidance, s_a, s_b, s_c))

    x_b64 = x_a.double() + (_expand(s_b, x_a) - _expand(s_a, x_a)) * _guided64(
        cond_a, uncond_a, guidance)
    x_c64 = x_b64 + (_expand(s_c, x_a) - _expand(s_b, x_a)) * _guided64(cond_b, uncond_b, guidance)
    one_step = x_a.double() + (_expand(s_c, x_a) - _expand(s_a, x_a)) * u_star.cpu().double()
    torch.testing.assert_close(one_step, x_c64, rtol=1e-5, atol=1e-5)


def test_public_api_accepts_floats_and_tensors():
    generator = torch.Generator().manual_seed(31)
    x, u_cond, u_uncond = (_random((2, 3, 4), torch.float32, generator) for _ in range(3))
    from_floats = cfg_euler_step(x, u_cond, u_uncond, 4.5, 0.8, 0.6)
    from_tensors = cfg_euler_step(x, u_cond, u_uncond, torch.tensor([4.5, 4.5]),
                                  torch.tensor(0.8), torch.tensor([0.6, 0.6], dtype=torch.float64))
    for got, expected in zip(from_tensors, from_floats, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    target = double_step_target(from_floats[1], u_cond, None, None, 0.8, 0.6, 0.4)
    expected = (0.2 * from_floats[1].double() + 0.2 * u_cond.double()) / 0.4
    torch.testing.assert_close(target.double(), expected, **FP32_TOL)


def test_non_contiguous_inputs_are_handled():
    generator = torch.Generator().manual_seed(41)
    base = _random((4, 6, 3), torch.float32, generator)
    x = base.transpose(1, 2)  # [4, 3, 6], non-contiguous
    u_cond = _random((4, 3, 6), torch.float32, generator)
    (sigma_from, sigma_to), _ = _scalars(4, generator, 2)
    x_next, g = cfg_euler_step_triton(*_to_device(x, u_cond, None, None, sigma_from, sigma_to))
    expected = x.double() + (_expand(sigma_to, x) - _expand(sigma_from, x)) * u_cond.double()
    torch.testing.assert_close(x_next.cpu().double(), expected, **FP32_TOL)
    assert x_next.is_contiguous() and g.is_contiguous()


def _valid_step_args(batch=2):
    x = torch.randn(batch, 3, 4)
    sigma = torch.full((batch,), 0.5)
    return {"x": x, "u_cond": torch.randn_like(x), "u_uncond": torch.randn_like(x),
            "guidance": torch.full((batch,), 5.0), "sigma_from": sigma, "sigma_to": sigma / 2}


BAD_STEP_ARGS = [
    ({"sigma_to": torch.zeros(3)}, ValueError,
     r"sigma_to: expected shape \(2,\) \(one value per sample\), got \(3,\)"),
    ({"guidance": torch.ones(2, 1)}, ValueError,
     r"guidance: expected shape \(2,\) \(one value per sample\), got \(2, 1\)"),
    ({"u_uncond": torch.randn(2, 3, 5)}, ValueError,
     r"u_uncond: expected shape \(2, 3, 4\) \(that of x\), got \(2, 3, 5\)"),
    ({"u_cond": torch.ones(2, 3, 4, dtype=torch.int32)}, TypeError,
     r"u_cond: expected dtype in \(.*\), got torch.int32"),
    ({"guidance": None}, ValueError, "guidance is required exactly when u_uncond is given"),
    ({"u_uncond": None}, ValueError, "guidance is required exactly when u_uncond is given"),
    ({"x": torch.tensor(1.0)}, ValueError, r"x: expected a batched tensor \[B, \.\.\.\]"),
    ({"u_cond": torch.randn(2, 3, 4, device="meta")}, ValueError,
     "expected all tensors on one device, got x on cpu, u_cond on meta"),
]


@pytest.mark.parametrize("override,error,message", BAD_STEP_ARGS)
@pytest.mark.parametrize("entry", [cfg_euler_step_triton, cfg_euler_step_reference,
                                   torch.ops.gpd.cfg_euler_step])
def test_bad_step_inputs_are_refused(override, error, message, entry):
    args = _valid_step_args() | override
    with pytest.raises(error, match=message):
        entry(*args.values())


def test_bad_target_inputs_are_refused():
    args = _valid_step_args()
    x, u_cond, sigma = args["x"], args["u_cond"], args["sigma_from"]
    with pytest.raises(ValueError, match=r"s_c: expected shape \(2,\) .*got \(1,\)"):
        double_step_target_triton(x, u_cond, None, None, sigma, sigma, torch.ones(1))
    with pytest.raises(TypeError, match="s_b: expected a float or a \\[B\\] tensor, got str"):
        double_step_target(x, u_cond, None, None, 0.5, "0.4", 0.3)
    with pytest.raises(TypeError, match="g1: expected a torch.Tensor, got float"):
        double_step_target(1.0, u_cond, None, None, 0.5, 0.4, 0.3)
