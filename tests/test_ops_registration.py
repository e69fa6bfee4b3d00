"""The gpd:: ops as other trainers see them: schemas, opcheck, torch.compile(fullgraph)."""

import pytest
import torch

import gpd_kernels
from gpd_kernels._native import native_unavailable_reason
from gpd_kernels._registry import SCHEMA_FILE
from gpd_kernels.reference import (
    band_amplitude_loss_grad_reference,
    cfg_euler_step_reference,
    freq_loss_grad_reference,
)

OPCHECK_CASES = {
    "freq_loss_with_grad": lambda: (
        torch.ops.gpd.freq_loss_fwd.default,
        (torch.randn(2, 3, 4, 5, 6, requires_grad=True), torch.randn(2, 3, 4, 5, 6),
         1.0, 0.5, 1.5, True)),
    "freq_loss_without_grad": lambda: (
        torch.ops.gpd.freq_loss_fwd.default,
        (torch.randn(1, 2, 3, 1, 7), torch.randn(1, 2, 3, 1, 7, requires_grad=True),
         0.3, 2.0, 1.0, False)),
    "band_amplitude_loss_with_grad": lambda: (
        torch.ops.gpd.band_amplitude_loss_fwd.default,
        (torch.randn(2, 3, 4, 5, 6, requires_grad=True), torch.randn(2, 3, 4, 5, 6), True)),
    "band_amplitude_loss_without_grad": lambda: (
        torch.ops.gpd.band_amplitude_loss_fwd.default,
        (torch.randn(1, 2, 3, 1, 7), torch.randn(1, 2, 3, 1, 7, requires_grad=True), False)),
    "cfg_euler_step_guided": lambda: (
        torch.ops.gpd.cfg_euler_step.default,
        (torch.randn(2, 3, 4).bfloat16(), torch.randn(2, 3, 4), torch.randn(2, 3, 4),
         torch.tensor([3.0, 5.0]), torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.2]))),
    "cfg_euler_step_unguided": lambda: (
        torch.ops.gpd.cfg_euler_step.default,
        (torch.randn(3, 5), torch.randn(3, 5), None, None, torch.rand(3), torch.rand(3))),
    "double_step_target_guided": lambda: (
        torch.ops.gpd.double_step_target.default,
        (torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 6), torch.tensor([4.0, 2.0]),
         torch.tensor([0.9, 0.6]), torch.tensor([0.8, 0.5]), torch.tensor([0.7, 0.4]))),
    "double_step_target_unguided": lambda: (
        torch.ops.gpd.double_step_target.default,
        (torch.randn(2, 6), torch.randn(2, 6).bfloat16(), None, None,
         torch.tensor([0.9, 0.6]), torch.tensor([0.8, 0.5]), torch.tensor([0.7, 0.4]))),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    op, args = OPCHECK_CASES[case]()
    results = torch.library.opcheck(op, args)
    assert set(results.values()) == {"SUCCESS"}, results


def test_python_definitions_follow_schema_file():
    if gpd_kernels.cpu_backend() != "reference":
        pytest.skip("the native library defines the schemas")
    assert native_unavailable_reason()
    for line in SCHEMA_FILE.read_text().splitlines():
        name = line.split("(", 1)[0]
        schema = getattr(torch.ops.gpd, name).default._schema
        assert str(schema) == f"gpd::{line}"


# Each loss form as a module with reduction="sum", and its float64 (loss, d loss / d pred).
COMPILE_CASES = {
    "freq_loss": (
        lambda: gpd_kernels.FrequencyLoss(alpha_s=1.5, alpha_t=0.5, gamma=2.0, reduction="sum"),
        lambda pred, target: freq_loss_grad_reference(pred, target, 1.5, 0.5, 2.0)),
    "band_amplitude_loss": (lambda: gpd_kernels.BandAmplitudeLoss(reduction="sum"),
                            band_amplitude_loss_grad_reference),
}


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_losses_compile_fullgraph_forward_and_backward(case):
    make_criterion, grad_reference = COMPILE_CASES[case]
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 2, 3, 6, 5, generator=generator, requires_grad=True)
    target = torch.randn(2, 2, 3, 6, 5, generator=generator)
    criterion = make_criterion()
    compiled = torch.compile(lambda p, t: criterion(p, t) * 0.5, fullgraph=True)
    loss = compiled(pred, target)
    loss.backward()
    loss_ref, grad_ref = grad_reference(pred.detach().double(), target.double())
    numel = pred.numel()
    assert loss.item() == pytest.approx(loss_ref.item() * numel * 0.5, rel=1e-5)
    torch.testing.assert_close(pred.grad.double(), grad_ref * numel * 0.5, rtol=1e-5, atol=1e-6)


def test_double_step_chain_compiles_fullgraph():
    generator = torch.Generator().manual_seed(1)
    x, u1, u2, u3, u4 = (torch.randn(2, 3, 4, 4, generator=generator) for _ in range(5))
    guidance = torch.tensor([5.0, 2.0])
    s_a, s_b, s_c = torch.tensor([0.9, 0.6]), torch.tensor([0.8, 0.5]), torch.tensor([0.7, 0.4])

    def online_target(x, u1, u2, u3, u4):
        x_b, g1 = gpd_kernels.cfg_euler_step(x, u1, u2, guidance, s_a, s_b)
        return x_b, gpd_kernels.double_step_target(g1, u3, u4, guidance, s_a, s_b, s_c)

    compiled = torch.compile(online_target, fullgraph=True, backend="aot_eager")
    x_b, u_star = compiled(x, u1, u2, u3, u4)
    x_b_ref, g1_ref = cfg_euler_step_reference(x, u1, u2, guidance, s_a, s_b)
    torch.testing.assert_close(x_b, x_b_ref)
    eager = online_target(x, u1, u2, u3, u4)[1]
    torch.testing.assert_close(u_star, eager)
