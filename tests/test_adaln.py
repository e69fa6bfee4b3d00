"""adaLN modulation ops: Triton (interpreter on CPU) against a float64 reference; the
model's fused-op path (forced on the CPU under the interpreter) against its eager path."""

import pytest
import torch

import gpd_kernels.dit as dit
from gpd_kernels import force_fused_dit_ops, fused_dit_ops, set_dit_op_backend
from gpd_kernels._launch import rows_per_program
from gpd_kernels.adaln import (
    GatedResidual,
    LayerNormModulate,
    gated_residual,
    gated_residual_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
# The kernels run on CUDA where there is one, else interpreted on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2, 5, 72, True), (1, 1, 33, False), (3, 7, 128, False)]


def _leaf(t: torch.Tensor, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return t.to(device=device, dtype=dtype).detach().requires_grad_(True)


def _grads_close(ours, reference, tol):
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq_len,dim,keep_dim", SHAPES)
def test_layernorm_modulate_matches_float64(batch, seq_len, dim, keep_dim, dtype):
    gen = torch.Generator().manual_seed(dim + seq_len)
    mod_shape = (batch, 1, dim) if keep_dim else (batch, dim)
    x = torch.randn(batch, seq_len, dim, generator=gen) * 3 + 0.5
    shift = torch.randn(mod_shape, generator=gen)
    scale = torch.randn(mod_shape, generator=gen) * 0.5
    grad = torch.randn(batch, seq_len, dim, generator=gen)
    ours_in = [_leaf(t, dtype, DEVICE) for t in (x, shift, scale)]
    ref_in = [_leaf(t.to(dtype), torch.float64) for t in (x, shift, scale)]
    out = layernorm_modulate(*ours_in, eps=1e-6)
    want = layernorm_modulate_reference(*ref_in, eps=1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.cpu().double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    out.backward(grad.to(device=DEVICE, dtype=dtype))
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
    ours_in = [_leaf(t, dtype, DEVICE) for t in (x, y, gate)]
    ref_in = [_leaf(t.to(dtype), torch.float64) for t in (x, y, gate)]
    out = gated_residual(*ours_in)
    want = gated_residual_reference(*ref_in)
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    out.backward(grad.to(device=DEVICE, dtype=dtype))
    want.backward(grad.to(dtype).double())
    _grads_close([t.grad for t in ours_in], [t.grad for t in ref_in], TOL[dtype] * 10)


# Per-token modulation (Wan2.2-TI2V): (batch, L, D, as_views). as_views: the vectors are
# views of one [B, L, k, D] tensor, as the model's unbind of its modulation gives them (token
# stride k * D, not D), so a kernel that assumed contiguous rows would read the wrong token.
TOKEN_SHAPES = [(2, 5, 72, True), (1, 1, 33, False), (3, 7, 128, False), (1, 6, 40, True)]


def _token_vectors(count, batch, seq_len, dim, gen):
    return [torch.randn(batch, seq_len, dim, generator=gen) for _ in range(count)]


def _view_leaves(vectors, as_views, dtype, device):
    """Leaves of ours; as_views: unbound from one packed leaf (after the cast), with one
    unused slot so that even a single vector has a token stride other than D."""
    if not as_views:
        return [_leaf(v, dtype, device) for v in vectors], None
    packed = _leaf(torch.stack([*vectors, torch.zeros_like(vectors[0])], dim=2), dtype, device)
    return list(packed.unbind(2)[:-1]), packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq_len,dim,as_views", TOKEN_SHAPES)
def test_layernorm_modulate_per_token_matches_float64(batch, seq_len, dim, as_views, dtype):
    gen = torch.Generator().manual_seed(3 * dim + seq_len)
    x = torch.randn(batch, seq_len, dim, generator=gen) * 3 + 0.5
    shift, scale = _token_vectors(2, batch, seq_len, dim, gen)
    scale = scale * 0.5
    grad = torch.randn(batch, seq_len, dim, generator=gen)
    x_ours = _leaf(x, dtype, DEVICE)
    (shift_ours, scale_ours), packed = _view_leaves([shift, scale], as_views, dtype, DEVICE)
    ref_in = [_leaf(t.to(dtype), torch.float64) for t in (x, shift, scale)]
    out = layernorm_modulate(x_ours, shift_ours, scale_ours, eps=1e-6)
    want = layernorm_modulate_reference(*ref_in, eps=1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.cpu().double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    out.backward(grad.to(device=DEVICE, dtype=dtype))
    want.backward(grad.to(dtype).double())
    if packed is None:
        got = [x_ours.grad, shift_ours.grad, scale_ours.grad]
        assert got[2].shape == (batch, seq_len, dim) and got[2].dtype == dtype
    else:
        got = [x_ours.grad, *packed.grad.unbind(2)[:-1]]
    _grads_close(got, [t.grad for t in ref_in], TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq_len,dim,as_views", TOKEN_SHAPES)
def test_gated_residual_per_token_matches_float64(batch, seq_len, dim, as_views, dtype):
    gen = torch.Generator().manual_seed(11 * dim + seq_len)
    x = torch.randn(batch, seq_len, dim, generator=gen)
    y = torch.randn(batch, seq_len, dim, generator=gen)
    (gate,) = _token_vectors(1, batch, seq_len, dim, gen)
    grad = torch.randn(batch, seq_len, dim, generator=gen)
    x_ours, y_ours = (_leaf(t, dtype, DEVICE) for t in (x, y))
    (gate_ours,), packed = _view_leaves([gate], as_views, dtype, DEVICE)
    ref_in = [_leaf(t.to(dtype), torch.float64) for t in (x, y, gate)]
    out = gated_residual(x_ours, y_ours, gate_ours)
    want = gated_residual_reference(*ref_in)
    torch.testing.assert_close(out.cpu().double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    out.backward(grad.to(device=DEVICE, dtype=dtype))
    want.backward(grad.to(dtype).double())
    gate_grad = gate_ours.grad if packed is None else packed.grad.unbind(2)[0]
    _grads_close([x_ours.grad, y_ours.grad, gate_grad], [t.grad for t in ref_in], TOL[dtype] * 10)


def test_per_token_reference_is_not_a_per_sample_one():
    """The float64 reference the kernels are checked against, against a loop over tokens
    written here (each token's row modulated by its own vectors)."""
    gen = torch.Generator().manual_seed(5)
    x, y, shift, scale, gate = (torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
                                for _ in range(5))
    for b in range(2):
        for i in range(4):
            row = x[b, i]
            x_hat = (row - row.mean()) / torch.sqrt(row.var(unbiased=False) + 1e-6)
            want = x_hat * (1 + scale[b, i]) + shift[b, i]
            torch.testing.assert_close(layernorm_modulate_reference(x, shift, scale)[b, i], want)
            torch.testing.assert_close(gated_residual_reference(x, y, gate)[b, i],
                                       x[b, i] + gate[b, i] * y[b, i])


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
        (lambda: layernorm_modulate(torch.randn(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 5, 4)),
         ValueError, r"or \[2, 3, 4\] \(per token\) for x of shape \(2, 3, 4\), got \(2, 5, 4\)"),
        (lambda: layernorm_modulate(torch.randn(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 3, 4)),
         ValueError, r"shift and scale must both be per sample or both per token"),
        (lambda: gated_residual(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.zeros(3, 3, 4)),
         ValueError, r"gate must be .*\[2, 3, 4\] \(per token\).*got \(3, 3, 4\)"),
        (lambda: layernorm_modulate(torch.ones(2, 3, 4, dtype=torch.int32), torch.zeros(2, 4),
                                    torch.zeros(2, 4)),
         TypeError, r"x: expected dtype in \(float32, .*, float64\), got torch.int32"),
        (lambda: layernorm_modulate(torch.randn(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 4),
                                    eps=0.0),
         ValueError, "eps must be > 0, got 0.0"),
        (lambda: gated_residual(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.zeros(2, 4)),
         ValueError, r"y must match x \(\(2, 3, 4\) on cpu\), got \(2, 5, 4\)"),
        (lambda: gated_residual(torch.randn(2, 3, 4), torch.randn(2, 3, 4), "gate"),
         TypeError, "gate: expected a torch.Tensor, got str"),
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


def test_float64_takes_the_exact_reference():
    """One dtype rule with the library ops: float64 is accepted, and computed in float64."""
    gen = torch.Generator().manual_seed(3)
    x, y = (torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    shift, scale = (torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    assert torch.equal(layernorm_modulate(x, shift, scale), layernorm_modulate_reference(
        x, shift, scale))
    assert torch.equal(gated_residual(x, y, shift), gated_residual_reference(x, y, shift))


FUSED_NODES = {"_LayerNormModulateFunctionBackward", "_GatedResidualFunctionBackward",
               "_RMSNormRoPEFunctionBackward"}


def _autograd_nodes(out: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def _model_case(num_layers: int = 2):
    """A 2-layer tiny model and inputs shaped from its own patch (2 token frames), so a
    preset change cannot leave the input invalid for one device only."""
    from gpd_model import WanDiT, get_preset

    torch.manual_seed(0)
    model = WanDiT(get_preset("tiny", num_layers=num_layers))
    pt, ph, pw = model.cfg.patch_size
    x = torch.randn(2, model.cfg.in_channels, 2 * pt, 3 * ph, 5 * pw)
    t = torch.tensor([900.0, 250.0])
    context = torch.randn(2, 5, model.cfg.text_dim)
    return model, x, t, context


def _forward_backward(model, x, t, context):
    x = x.detach().requires_grad_(True)
    out = model(x, t, context)
    out.square().mean().backward()
    return out, x.grad


def _eager_cpu_reference(num_layers: int = 2):
    model, x, t, context = _model_case(num_layers)
    want, want_grad = _forward_backward(model, x, t, context)
    return model, (x, t, context), want, want_grad


def test_model_fused_path_on_cpu_matches_eager():
    """The CPU twin of the CUDA test below: the same model and inputs through the fused
    DiT ops (Triton interpreted), against the model's own eager path."""
    model, inputs, want, want_grad = _eager_cpu_reference()
    assert not fused_dit_ops(inputs[0])
    with force_fused_dit_ops():
        assert fused_dit_ops(inputs[0]) and not fused_dit_ops(inputs[0].double())
        got, got_grad = _forward_backward(model, *inputs)
    assert FUSED_NODES <= _autograd_nodes(got)  # the fused path really ran
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the model's fused CUDA path needs a CUDA GPU (none on this machine; "
                           "test_model_fused_path_on_cpu_matches_eager runs its logic on the CPU)")
def test_model_on_cuda_with_fused_ops_matches_cpu_reference():
    model, inputs, want, want_grad = _eager_cpu_reference()
    model.cuda()
    got, got_grad = _forward_backward(model, *(t.cuda() for t in inputs))
    assert FUSED_NODES <= _autograd_nodes(got)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_grad.cpu(), want_grad, atol=1e-4, rtol=1e-3)


def test_compile_backend_serves_the_reference_per_op(monkeypatch):
    """A DiT op switched to "compile" runs torch.compile of its reference, the others stay
    fused. torch.compile is stubbed (inductor would take minutes on 2 cores): what is checked
    is the dispatch, and that the model's numbers do not move."""
    compiled = []

    def fake_compile(fn):
        compiled.append(fn.__name__)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    dit._compiled.cache_clear()
    model, inputs, want, _ = _eager_cpu_reference(num_layers=1)
    try:
        set_dit_op_backend("gated_residual", "compile")
        with force_fused_dit_ops():
            got, _ = _forward_backward(model, *inputs)
    finally:
        set_dit_op_backend("gated_residual", "triton")
        dit._compiled.cache_clear()
    assert compiled == ["gated_residual_reference"]
    nodes = _autograd_nodes(got)
    assert "_GatedResidualFunctionBackward" not in nodes
    assert FUSED_NODES - {"_GatedResidualFunctionBackward"} <= nodes
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("setting,message", [
    ("gated_residual=fast", r"gated_residual: expected a backend in \('triton', 'compile'\), "
                            "got 'fast'"),
    ("rms_norm=compile", r"DiT op: expected one of \(.*'rms_norm_rope'\), got 'rms_norm'"),
    ("gated_residual", "GPD_DIT_OP_BACKENDS: expected name=backend items, got 'gated_residual'"),
])
def test_bad_backend_settings_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        dit._from_environment(setting)
    assert dit._from_environment(" layernorm_modulate=compile, ") == {
        "layernorm_modulate": "compile"}


def test_forcing_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="expected TRITON_INTERPRET=1"):
        with force_fused_dit_ops():
            pass
