"""adaLN modulation ops: Triton (interpreter on CPU) against a float64 reference."""

import pytest
import torch

from gpd_kernels.adaln import (
    GatedResidual,
    LayerNormModulate,
    gated_residual,
    gated_residual_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
    rows_per_program,
)

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
SHAPES = [(2, 5, 72, True), (1, 1, 33, False), (3, 7, 128, False)]


def _leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).detach().requires_grad_(True)


def _grads_close(ours, reference, tol):
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq_len,dim,keep_dim", SHAPES)
def test_layernorm_modulate_matches_float64(batch, seq_len, dim, keep_dim, dtype):
    gen = torch.Generator().manual_seed(dim + seq_len)
    mod_shape = (batch, 1, dim) if keep_dim else (batch, dim)
    x = torch.randn(batch, seq_len, dim, generator=gen) * 3 + 0.5
    shift = torch.randn(mod_shape, generator=gen)
    scale = torch.randn(mod_shape, generator=gen) * 0.5
    grad = torch.randn(batch, seq_len, dim, generator=gen)
    ours_in = [_leaf(t, dtype) for t in (x, shift, scale)]
    ref_in = [_leaf(t.to(dtype), torch.float64) for t in (x, shift, scale)]
    out = layernorm_modulate(*ours_in, eps=1e-6)
    want = layernorm_modulate_reference(*ref_in, eps=1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    out.backward(grad.to(dtype))
    want.backward(grad.to(dtype).double())
    assert ours_in[1].grad.shape == mod_shape and ours_in[1].grad.dtype == dtype
    # bf16 gradients sum over L rounded bf16 products: loosen by the row count.
    tol = TOL[dtype] * (1 if dtype == torch.float32 else 4)
    _grads_close([t.grad for t in ours_in], [t.grad for t in ref_in], tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq_len,dim,keep_dim", SHAPES)
def test_gated_residual_matches_float64(batch, seq_len, dim, keep_dim, dtype):
    gen = torch.Generator().manual_seed(7 * dim + seq_len)
    gate_shape = (batch, 1, dim) if keep_dim else (batch, dim)
    x = torch.randn(batch, seq_len, dim, generator=gen)
    y = torch.randn(batch, seq_len, dim, generator=gen)
    gate = torch.randn(gate_shape, generator=gen)
    grad = torch.randn(batch, seq_len, dim, generator=gen)
    ours_in = [_leaf(t, dtype) for t in (x, y, gate)]
    ref_in = [_leaf(t.to(dtype), torch.float64) for t in (x, y, gate)]
    out = gated_residual(*ours_in)
    want = gated_residual_reference(*ref_in)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    out.backward(grad.to(dtype))
    want.backward(grad.to(dtype).double())
    _grads_close([t.grad for t in ours_in], [t.grad for t in ref_in], TOL[dtype] * 10)


def test_modules_and_mixed_modulation_dtype():
    # Wan keeps the modulation in fp32 while activations are bf16.
    x = torch.randn(2, 3, 40).bfloat16()
    shift, scale, gate = (torch.randn(2, 1, 40) for _ in range(3))
    out = LayerNormModulate(eps=1e-6)(x, shift, scale)
    torch.testing.assert_close(
        out.double(), layernorm_modulate_reference(x.double(), shift.double(), scale.double()),
        atol=0.05, rtol=0.02)
    res = GatedResidual()(x, out, gate)
    assert res.dtype == torch.bfloat16 and res.shape == x.shape


def test_rows_per_program_covers_every_row():
    for seq_len in (1, 5, 97, 32760):
        rows, chunks = rows_per_program(seq_len, 2, torch.device("cpu"))
        assert rows * chunks >= seq_len > rows * (chunks - 1)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: layernorm_modulate(torch.randn(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)),
         ValueError, r"x must be \[B, L, D\], got shape \(2, 3\)"),
        (lambda: layernorm_modulate(torch.randn(2, 3, 4), torch.zeros(2, 4), torch.zeros(1, 4)),
         ValueError, r"scale must be \[2, 1, 4\] or \[2, 4\].*got \(1, 4\)"),
        (lambda: layernorm_modulate(torch.randn(2, 3, 4).double(), torch.zeros(2, 4),
                                    torch.zeros(2, 4)),
         TypeError, "x must be float32, bfloat16 or float16, got torch.float64"),
        (lambda: layernorm_modulate(torch.randn(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 4),
                                    eps=0.0),
         ValueError, "eps must be > 0, got 0.0"),
        (lambda: gated_residual(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.zeros(2, 4)),
         ValueError, r"y must match x \(\(2, 3, 4\) on cpu\), got \(2, 5, 4\)"),
        (lambda: gated_residual(torch.randn(2, 3, 4), torch.randn(2, 3, 4), "gate"),
         TypeError, "gate must be a torch.Tensor, got str"),
    ],
)
def test_bad_input_messages(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_matches_the_models_eager_modulation():
    """The fused ops against the model's eager code for the same step (CPU branch)."""
    from gpd_model.model import modulate

    x = torch.randn(2, 9, 72)
    mod = torch.randn(2, 6, 72)  # a block's six modulation vectors; unbind gives views
    shift, scale, gate = mod.unbind(1)[:3]
    want = modulate(torch.nn.functional.layer_norm(x, (72,), eps=1e-6), shift, scale)
    torch.testing.assert_close(layernorm_modulate(x, shift, scale, 1e-6), want,
                               atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(gated_residual(x, want, gate),
                               torch.addcmul(x, want, gate.unsqueeze(1)), atol=2e-6, rtol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the model's fused CUDA path needs a CUDA GPU (none on this machine)")
def test_model_on_cuda_with_fused_ops_matches_cpu_reference():
    from gpd_model import WanDiT, get_preset

    torch.manual_seed(0)
    model = WanDiT(get_preset("tiny", num_layers=2))
    x = torch.randn(2, 3, 3, 6, 10, requires_grad=True)
    t = torch.tensor([900.0, 250.0])
    context = torch.randn(2, 5, model.cfg.text_dim)
    want = model(x, t, context)
    want.square().mean().backward()
    want_grad = x.grad.clone()
    x.grad = None
    model.cuda()
    x_cuda = x.detach().cuda().requires_grad_(True)
    got = model(x_cuda, t.cuda(), context.cuda())
    got.square().mean().backward()
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_cuda.grad.cpu(), want_grad, atol=1e-4, rtol=1e-3)
