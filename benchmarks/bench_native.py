"""Native C++ CPU ops (libgpd_native) vs the Python torch.fft / eager references, on the CPU.

Groups: the frequency loss in both forms (the paper's freq_loss and band_amplitude_loss)
forward+backward at the tiny preset's latent [16, 3, 8, 16, 16] and Wan 480p's
[1, 16, 21, 60, 104] (fp32 and bf16 inputs), and the teacher double-step ops at 480p.
"native-op" calls torch.ops.gpd.<loss>_fwd(need_grad=True) (loss and gradient in one pass);
"native-api" is gpd_kernels.<loss>(...).backward() (autograd around it); "reference" is
gpd_kernels.reference.<loss>_reference(...).backward() (torch.fft, autograd).
Native cases skip, with the reason, when the library is not built.

Run: `python -m pytest benchmarks/bench_native.py` (threads: benchmarks/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import gpd_kernels
from gpd_kernels._native import native_unavailable_reason
from gpd_kernels.reference import (
    band_amplitude_loss_reference,
    cfg_euler_step_reference,
    double_step_target_reference,
    freq_loss_reference,
)

NATIVE = gpd_kernels.cpu_backend() == "native"
NO_NATIVE = f"native library not active: {native_unavailable_reason()}"
LATENTS = {"tiny-b16": (16, 3, 8, 16, 16), "wan480p-b1": (1, 16, 21, 60, 104)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHTS = (1.0, 1.0, 1.0)  # alpha_s, alpha_t, gamma: every axis term active
ROUNDS = {"tiny-b16": 100, "wan480p-b1": 20}


def _cpu_tag() -> str:
    return f"(cpu, {torch.get_num_threads()} threads)"


def _latents(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(shape, generator=generator).to(dtype).requires_grad_(True)
    target = torch.randn(shape, generator=generator).to(dtype)
    return pred, target


def _backward(loss_fn):
    """A step of loss_fn(pred, target).backward() on a fresh gradient."""
    def step(pred, target):
        pred.grad = None
        loss_fn(pred, target).backward()
    return step


LOSS_IMPLS = {
    "freq_loss": {
        "native-op": lambda pred, target: torch.ops.gpd.freq_loss_fwd(
            pred.detach(), target, *WEIGHTS, True),
        "native-api": _backward(lambda pred, target: gpd_kernels.freq_loss(pred, target,
                                                                           *WEIGHTS)),
        "reference": _backward(lambda pred, target: freq_loss_reference(pred, target,
                                                                        *WEIGHTS))},
    "band_amplitude_loss": {
        "native-op": lambda pred, target: torch.ops.gpd.band_amplitude_loss_fwd(
            pred.detach(), target, True),
        "native-api": _backward(gpd_kernels.band_amplitude_loss),
        "reference": _backward(band_amplitude_loss_reference)},
}


@pytest.mark.parametrize("impl", ["native-op", "native-api", "reference"])
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape_name", LATENTS)
@pytest.mark.parametrize("loss", LOSS_IMPLS)
def test_loss_fwd_bwd(benchmark, loss, shape_name, dtype_name, impl):
    if impl.startswith("native") and not NATIVE:
        pytest.skip(NO_NATIVE)
    benchmark.group = f"{loss} fwd+bwd {shape_name} {dtype_name} {_cpu_tag()}"
    pred, target = _latents(LATENTS[shape_name], DTYPES[dtype_name])
    benchmark.pedantic(LOSS_IMPLS[loss][impl], args=(pred, target), rounds=ROUNDS[shape_name],
                       warmup_rounds=2)


def _guided_inputs(dtype):
    shape = LATENTS["wan480p-b1"]
    generator = torch.Generator().manual_seed(1)
    x, cond, uncond = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    guidance, s_a, s_b, s_c = (torch.tensor([value]) for value in (5.0, 0.9, 0.8, 0.7))
    return x, cond, uncond, guidance, s_a, s_b, s_c


def _double_step_native(x, cond, uncond, guidance, s_a, s_b, s_c):
    _, g1 = torch.ops.gpd.cfg_euler_step(x, cond, uncond, guidance, s_a, s_b)
    torch.ops.gpd.double_step_target(g1, cond, uncond, guidance, s_a, s_b, s_c)


def _double_step_reference(x, cond, uncond, guidance, s_a, s_b, s_c):
    _, g1 = cfg_euler_step_reference(x, cond, uncond, guidance, s_a, s_b)
    double_step_target_reference(g1, cond, uncond, guidance, s_a, s_b, s_c)


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_teacher_double_step(benchmark, dtype_name, impl):
    """cfg_euler_step then double_step_target (the second teacher output reused as u_cond)."""
    if impl == "native" and not NATIVE:
        pytest.skip(NO_NATIVE)
    benchmark.group = f"teacher double-step wan480p-b1 {dtype_name} {_cpu_tag()}"
    fn = _double_step_native if impl == "native" else _double_step_reference
    benchmark.pedantic(fn, args=_guided_inputs(DTYPES[dtype_name]), rounds=20, warmup_rounds=2)
