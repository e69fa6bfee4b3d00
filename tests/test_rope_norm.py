"""Fused q/k RMSNorm + RoPE: Triton (interpreter on CPU) against a float64 reference."""

import math

import pytest
import torch

from gpd_kernels.rope_norm import RMSNormRoPE, rms_norm_rope, rms_norm_rope_reference

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
# The kernels run on CUDA where there is one, else interpreted on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tables(seq_len: int, half: int, gen: torch.Generator):
    angles = torch.rand(seq_len, half, generator=gen, dtype=torch.float64) * 2 * math.pi
    return angles.cos().float(), angles.sin().float()


def _complex_rope(normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's formulation: pairs as complex numbers times exp(i * angle)."""
    pairs = torch.view_as_complex(normed.reshape(*normed.shape[:-1], -1, 2).contiguous())
    rot = torch.polar(torch.ones_like(cos.double()), torch.atan2(sin.double(), cos.double()))
    return torch.view_as_real(pairs * rot[None, :, None, :]).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq_len,heads,head_dim", [
    (2, 5, 3, 24), (1, 1, 1, 2), (2, 3, 12, 10), (1, 4, 2, 128)])
def test_rms_norm_rope_matches_float64(batch, seq_len, heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(seq_len * 100 + heads * 10 + head_dim)
    x = torch.randn(batch, seq_len, heads, head_dim, generator=gen) * 2
    weight = 1 + 0.3 * torch.randn(heads * head_dim, generator=gen)
    cos, sin = _tables(seq_len, head_dim // 2, gen)
    grad = torch.randn(batch, seq_len, heads, head_dim, generator=gen)
    x_ours = x.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    w_ours = weight.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    x_ref = x.to(dtype).detach().double().requires_grad_(True)
    w_ref = weight.to(dtype).detach().double().requires_grad_(True)
    out = rms_norm_rope(x_ours, w_ours, cos.to(DEVICE), sin.to(DEVICE), eps=1e-6)
    want = rms_norm_rope_reference(x_ref, w_ref, cos.double(), sin.double(), eps=1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), want, atol=tol * 4, rtol=tol)
    out.backward(grad.to(device=DEVICE, dtype=dtype))
    want.backward(grad.to(dtype).double())
    torch.testing.assert_close(x_ours.grad.cpu().double(), x_ref.grad, atol=tol * 10,
                               rtol=tol * 10)
    # The weight gradient sums B*L*... bf16-rounded products: scale tolerance by magnitude.
    w_scale = w_ref.grad.abs().max().item() + 1
    torch.testing.assert_close(w_ours.grad.cpu().double(), w_ref.grad, atol=tol * 10 * w_scale,
                               rtol=tol * 10)


def test_reference_agrees_with_complex_formulation():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 4, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(64, generator=gen, dtype=torch.float64)
    cos, sin = _tables(6, 8, gen)
    normed = x * torch.rsqrt(x.pow(2).mean(dim=(-2, -1), keepdim=True) + 1e-6)
    normed = normed * weight.view(4, 16)
    torch.testing.assert_close(
        rms_norm_rope_reference(x, weight, cos.double(), sin.double()),
        _complex_rope(normed, cos, sin))


def test_module_holds_weight():
    module = RMSNormRoPE(2 * 8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 2, 8, generator=gen)
    cos, sin = _tables(3, 4, gen)
    module(x, cos, sin).square().sum().backward()
    assert module.weight.grad is not None and module.weight.grad.shape == (16,)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(1, 2, 8)), ValueError, r"x must be \[B, L, H, Dh\]"),
        (dict(x=torch.randn(1, 2, 2, 3)), ValueError,
         r"head_dim \(x.shape\[3\]\) must be even for RoPE pairs, got 3"),
        (dict(weight=torch.ones(8)), ValueError, r"weight must be \[16\] \(H\*Dh\), got \(8,\)"),
        (dict(cos=torch.ones(3, 4)), ValueError, r"cos must be \[2, 4\] \(L, Dh/2\), got \(3, 4\)"),
        (dict(sin=torch.ones(2, 4, dtype=torch.int32)), TypeError,
         r"sin: expected dtype in \(float32, bfloat16, float16, float64\), got torch.int32"),
        (dict(eps=-1.0), ValueError, "eps must be > 0, got -1.0"),
    ],
)
def test_bad_input_messages(kwargs, error, match):
    args = dict(x=torch.randn(1, 2, 2, 8), weight=torch.ones(16), cos=torch.ones(2, 4),
                sin=torch.zeros(2, 4), eps=1e-6)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        rms_norm_rope(**args)


def test_strided_views_from_fused_qkv_and_complex_table():
    """q sliced from a fused qkv output and tables viewed from a complex table: no copies
    needed, same numbers as contiguous inputs (values and gradients)."""
    gen = torch.Generator().manual_seed(11)
    batch, seq_len, heads, head_dim = 2, 3, 3, 6
    qkv = torch.randn(batch, seq_len, 3 * heads * head_dim, generator=gen, requires_grad=True)
    weight = torch.randn(heads * head_dim, generator=gen)
    angles = torch.rand(seq_len, 1, head_dim // 2, generator=gen, dtype=torch.float64)
    rotations = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    table = torch.view_as_real(rotations.squeeze(1))
    q = qkv.chunk(3, dim=-1)[1].unflatten(-1, (heads, head_dim))
    out = rms_norm_rope(q, weight, table[..., 0], table[..., 1])
    dense_q = q.detach().contiguous().double().requires_grad_(True)
    want = rms_norm_rope_reference(dense_q, weight.double(), table[..., 0].double(),
                                   table[..., 1].double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    want.backward(grad.double())
    torch.testing.assert_close(qkv.grad.chunk(3, dim=-1)[1].unflatten(-1, (heads, head_dim)),
                               dense_q.grad.float(), atol=1e-5, rtol=1e-5)
    assert qkv.grad.chunk(3, dim=-1)[0].abs().max() == 0


def test_matches_the_models_eager_rmsnorm_and_complex_rope():
    """The model's CUDA branch (fused op on views of its complex table) against its CPU
    branch (nn.RMSNorm then complex RoPE), on the model's real 3D table, here on the CPU."""
    from gpd_model import get_preset
    from gpd_model.model import apply_rope, rope_table

    cfg = get_preset("tiny", dim=72, num_heads=3)  # head_dim 24 -> rope split 8/8/8
    grid = (3, 2, 5)
    rotations = rope_table(cfg, grid, torch.device("cpu"))
    norm = torch.nn.RMSNorm(cfg.dim, eps=cfg.eps)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = torch.randn(2, 30, cfg.dim)
    want = apply_rope(norm(x).unflatten(-1, (cfg.num_heads, -1)), rotations)
    table = torch.view_as_real(rotations.squeeze(1))
    got = rms_norm_rope(x.unflatten(-1, (cfg.num_heads, -1)), norm.weight,
                        table[..., 0], table[..., 1], cfg.eps)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_float64_takes_the_exact_reference():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 2, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(12, generator=gen, dtype=torch.float64)
    cos, sin = (t.double() for t in _tables(3, 3, gen))
    assert torch.equal(rms_norm_rope(x, weight, cos, sin),
                       rms_norm_rope_reference(x, weight, cos, sin))


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused-interpreted"])
def test_model_under_bf16_autocast_keeps_q_k_in_bf16_without_dtype_warnings(fused):
    """Issue 14: under bf16 autocast the fp32 RMSNorm weights met bf16 activations (torch
    warned "Mismatch dtype between input and weight" and skipped its fused RMSNorm; the
    eager q/k path promoted to fp32 and attention refused the mixed dtypes). The model
    casts the weights to the activations' dtype; the fp32 numbers are unchanged (parity
    tests). Checked against the fp32 model at bf16 tolerance, eager and fused paths."""
    import contextlib
    import warnings

    from gpd_kernels import force_fused_dit_ops
    from gpd_model import WanDiT, get_preset

    torch.manual_seed(0)
    model = WanDiT(get_preset("tiny", num_layers=1))
    pt, ph, pw = model.cfg.patch_size
    x = torch.randn(2, model.cfg.in_channels, pt, 2 * ph, 3 * pw)
    t, context = torch.tensor([900.0, 250.0]), torch.randn(2, 5, model.cfg.text_dim)
    want = model(x, t, context).double()
    path = force_fused_dit_ops() if fused else contextlib.nullcontext()
    with warnings.catch_warnings(record=True) as caught, path:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, context)
        out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert not [w for w in caught if "dtype" in str(w.message).lower()], caught
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(out.double(), want, atol=0.05 * want.abs().max().item(),
                               rtol=0.05)
