"""Fused adaLN modulation for DiT blocks.

Two ops, each a Triton kernel pair (forward, backward), a float PyTorch reference,
an autograd.Function and a thin module:

- `layernorm_modulate(x, shift, scale)`: LayerNorm over the last dim without affine,
  then `x_hat * (1 + scale) + shift` with per-sample `scale`/`shift` ([B, 1, D] or
  [B, D]) or per-token ones ([B, L, D]: Wan2.2-TI2V, whose tokens have timesteps of
  their own). One pass over `x` instead of eager's four (norm, mul, add, cast).
- `gated_residual(x, y, gate)`: `x + gate * y` with a per-sample or per-token gate.

Per-token vectors are read through their strides (a block's six modulation vectors are
views of one [B, L, 6, D] tensor; copying each would move as many bytes as `x`). The
per-sample kernels are compiled separately (`PER_TOKEN` is a constexpr), so the
per-sample path runs the same code as before per-token support.

Inputs fp32 or bf16/fp16; math in fp32; outputs in `x`'s dtype. The Triton path runs
on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests); plain CPU
calls and float64 inputs use the reference (launch rules: `_launch`).

The forward and backward are also CPU ops, `torch.ops.gpd.adaln_modulate_fwd/bwd` and
`gated_residual_fwd/bwd` (for other trainers and C++ callers, as the other gpd:: ops):
the native library's kernels (csrc/adaln.cpp) when built, else the references below, with
the same checks and messages.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float_tensor, check_rank, check_same_device, check_same_shape
from ._launch import num_warps, rows_per_program, use_triton
from ._registry import register_cpu

_MAX_WARPS = 16

__all__ = [
    "GatedResidual",
    "LayerNormModulate",
    "gated_residual",
    "gated_residual_reference",
    "layernorm_modulate",
    "layernorm_modulate_reference",
]


@triton.jit
def _ln_modulate_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr, mean_ptr, rstd_ptr,
    seq_len, dim, eps, shift_stride_b, shift_stride_t, scale_stride_b, scale_stride_t,
    BLOCK_D: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * dim passes 2**31 for big 480p batches
    batch = row // seq_len
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / dim
    centered = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / dim + eps)
    if PER_TOKEN:
        local = row - batch * seq_len
        shift_at = shift_ptr + batch * shift_stride_b + local * shift_stride_t
        scale_at = scale_ptr + batch * scale_stride_b + local * scale_stride_t
    else:
        shift_at = shift_ptr + batch * dim
        scale_at = scale_ptr + batch * dim
    shift = tl.load(shift_at + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_at + cols, mask=mask, other=0.0).to(tl.float32)
    out = centered * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row * dim + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _ln_modulate_bwd_kernel(
    grad_out_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr,
    grad_x_ptr, partial_dscale_ptr, partial_dshift_ptr,
    seq_len, dim, rows_per_prog, num_chunks, scale_stride_b, scale_stride_t,
    BLOCK_D: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    # Each program walks a chunk of one sample's rows, writing dx per row. Per sample it
    # keeps the dscale/dshift partial sums in registers (summed over chunks later); per
    # token dscale is written per row into partial_dscale ([B * L, D]) and dshift, which
    # is then grad_out itself, is not computed.
    batch = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    if not PER_TOKEN:
        one_plus_scale = 1.0 + tl.load(
            scale_ptr + batch * dim + cols, mask=mask, other=0.0).to(tl.float32)
        dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
        dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = chunk * rows_per_prog
    stop = tl.minimum(start + rows_per_prog, seq_len)
    for local in range(start, stop):
        row = batch * seq_len + local
        x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(grad_out_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        if PER_TOKEN:
            # (row - batch * seq_len) is local in int64: local * stride passes 2**31.
            scale_at = scale_ptr + batch * scale_stride_b + (row - batch * seq_len) * scale_stride_t
            one_plus_scale = 1.0 + tl.load(scale_at + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(partial_dscale_ptr + row * dim + cols, dy * x_hat, mask=mask)
        else:
            dscale += dy * x_hat
            dshift += dy
        dx_hat = dy * one_plus_scale
        c1 = tl.sum(dx_hat * x_hat, axis=0) / dim
        c2 = tl.sum(dx_hat, axis=0) / dim
        dx = (dx_hat - c2 - x_hat * c1) * rstd
        tl.store(grad_x_ptr + row * dim + cols, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if not PER_TOKEN:
        partial = (batch * num_chunks + chunk) * dim + cols
        tl.store(partial_dscale_ptr + partial, dscale, mask=mask)
        tl.store(partial_dshift_ptr + partial, dshift, mask=mask)


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr,
    seq_len, dim, gate_stride_b, gate_stride_t,
    BLOCK_D: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * dim passes 2**31 for big 480p batches
    batch = row // seq_len
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
    if PER_TOKEN:
        gate_at = gate_ptr + batch * gate_stride_b + (row - batch * seq_len) * gate_stride_t
    else:
        gate_at = gate_ptr + batch * dim
    gate = tl.load(gate_at + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (x + gate * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    grad_out_ptr, y_ptr, gate_ptr, grad_y_ptr, partial_dgate_ptr,
    seq_len, dim, rows_per_prog, num_chunks, gate_stride_b, gate_stride_t,
    BLOCK_D: tl.constexpr, PER_TOKEN: tl.constexpr,
):
    # Per token, dgate is written per row into partial_dgate ([B * L, D]) instead of summed.
    batch = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    if not PER_TOKEN:
        gate = tl.load(gate_ptr + batch * dim + cols, mask=mask, other=0.0).to(tl.float32)
        dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = chunk * rows_per_prog
    stop = tl.minimum(start + rows_per_prog, seq_len)
    for local in range(start, stop):
        row = batch * seq_len + local
        dout = tl.load(grad_out_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        if PER_TOKEN:
            gate_at = gate_ptr + batch * gate_stride_b + (row - batch * seq_len) * gate_stride_t
            gate = tl.load(gate_at + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(partial_dgate_ptr + row * dim + cols, dout * y, mask=mask)
        else:
            dgate += dout * y
        tl.store(grad_y_ptr + row * dim + cols,
                 (dout * gate).to(grad_y_ptr.dtype.element_ty), mask=mask)
    if not PER_TOKEN:
        tl.store(partial_dgate_ptr + (batch * num_chunks + chunk) * dim + cols, dgate, mask=mask)


def modulation_vector(name: str, vec: torch.Tensor, x: torch.Tensor) -> bool:
    """Check a modulation vector against x [B, L, D]; return whether it is per token.

    Per sample: [B, 1, D] or [B, D]. Per token: [B, L, D] (with L = 1 it is per sample).
    """
    check_float_tensor(name, vec)
    batch, tokens, dim = x.shape
    if tuple(vec.shape) not in ((batch, 1, dim), (batch, dim), (batch, tokens, dim)):
        raise ValueError(
            f"{name} must be [{batch}, 1, {dim}] or [{batch}, {dim}] (per sample) or "
            f"[{batch}, {tokens}, {dim}] (per token) for x of shape {tuple(x.shape)}, "
            f"got {tuple(vec.shape)}"
        )
    if vec.device != x.device:
        raise ValueError(f"{name} must be on {x.device} like x, got {vec.device}")
    return vec.dim() == 3 and vec.shape[1] != 1


def _broadcastable(vec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A modulation vector as [B, 1, D] (per sample) or [B, L, D] (per token)."""
    return vec.reshape(x.shape[0], -1, x.shape[-1])


def _kernel_vector(vec: torch.Tensor, x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """What the kernels read: a contiguous [B, D] per sample; per token a [B, L, D] view
    whose rows are contiguous (its batch and token strides go to the kernel)."""
    if not per_token:
        return vec.reshape(x.shape[0], x.shape[-1]).contiguous()
    return vec if vec.stride(-1) == 1 else vec.contiguous()


def _token_strides(vec: torch.Tensor, per_token: bool) -> tuple[int, int]:
    return (vec.stride(0), vec.stride(1)) if per_token else (0, 0)


def layernorm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """PyTorch reference in the input's precision (pass float64 for an exact check)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x_hat = torch.nn.functional.layer_norm(x.to(compute), (x.shape[-1],), eps=eps)
    shift = _broadcastable(shift, x).to(compute)
    scale = _broadcastable(scale, x).to(compute)
    return (x_hat * (1 + scale) + shift).to(x.dtype)


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of `x + gate * y` (math in at least fp32)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    gate = _broadcastable(gate, x).to(compute)
    return (x.to(compute) + gate * y.to(compute)).to(x.dtype)


class _LayerNormModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps, per_token):
        batch, seq_len, dim = x.shape
        x_c = x.contiguous()
        shift_c = _kernel_vector(shift, x, per_token)
        scale_c = _kernel_vector(scale, x, per_token)
        out = torch.empty_like(x_c)
        mean = torch.empty(batch * seq_len, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_d = triton.next_power_of_2(dim)
        _ln_modulate_fwd_kernel[(batch * seq_len,)](
            x_c, shift_c, scale_c, out, mean, rstd, seq_len, dim, eps,
            *_token_strides(shift_c, per_token), *_token_strides(scale_c, per_token),
            BLOCK_D=block_d, PER_TOKEN=per_token, num_warps=num_warps(block_d, _MAX_WARPS),
        )
        ctx.save_for_backward(x_c, scale_c, mean, rstd)
        ctx.shapes = (shift.shape, shift.dtype, scale.shape, scale.dtype)
        ctx.per_token = per_token
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, mean, rstd = ctx.saved_tensors
        shift_shape, shift_dtype, scale_shape, scale_dtype = ctx.shapes
        per_token = ctx.per_token
        batch, seq_len, dim = x.shape
        rows, chunks = rows_per_program(seq_len, batch, x.device)
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x)
        # Per token: dscale per row, and dshift is grad_out itself (no buffer for it).
        partial_dscale = torch.empty(batch, seq_len if per_token else chunks, dim,
                                     device=x.device, dtype=torch.float32)
        partial_dshift = partial_dscale if per_token else torch.empty_like(partial_dscale)
        block_d = triton.next_power_of_2(dim)
        _ln_modulate_bwd_kernel[(batch, chunks)](
            grad_out, x, scale, mean, rstd, grad_x, partial_dscale, partial_dshift,
            seq_len, dim, rows, chunks, *_token_strides(scale, per_token),
            BLOCK_D=block_d, PER_TOKEN=per_token, num_warps=num_warps(block_d, _MAX_WARPS),
        )
        if per_token:
            grad_shift = grad_out.reshape(shift_shape).to(shift_dtype)
            grad_scale = partial_dscale.reshape(scale_shape).to(scale_dtype)
        else:
            grad_shift = partial_dshift.sum(1).reshape(shift_shape).to(shift_dtype)
            grad_scale = partial_dscale.sum(1).reshape(scale_shape).to(scale_dtype)
        return grad_x, grad_shift, grad_scale, None, None


class _GatedResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, per_token):
        batch, seq_len, dim = x.shape
        y_c = y.contiguous()
        gate_c = _kernel_vector(gate, x, per_token)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        block_d = triton.next_power_of_2(dim)
        _gated_residual_fwd_kernel[(batch * seq_len,)](
            x.contiguous(), y_c, gate_c, out, seq_len, dim, *_token_strides(gate_c, per_token),
            BLOCK_D=block_d, PER_TOKEN=per_token, num_warps=num_warps(block_d, _MAX_WARPS),
        )
        ctx.save_for_backward(y_c, gate_c)
        ctx.gate_meta = (gate.shape, gate.dtype)
        ctx.x_dtype = x.dtype
        ctx.per_token = per_token
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, gate = ctx.saved_tensors
        gate_shape, gate_dtype = ctx.gate_meta
        per_token = ctx.per_token
        batch, seq_len, dim = y.shape
        rows, chunks = rows_per_program(seq_len, batch, y.device)
        grad_y = torch.empty_like(y)
        partial_dgate = torch.empty(batch, seq_len if per_token else chunks, dim,
                                    device=y.device, dtype=torch.float32)
        block_d = triton.next_power_of_2(dim)
        _gated_residual_bwd_kernel[(batch, chunks)](
            grad_out.contiguous(), y, gate, grad_y, partial_dgate,
            seq_len, dim, rows, chunks, *_token_strides(gate, per_token),
            BLOCK_D=block_d, PER_TOKEN=per_token, num_warps=num_warps(block_d, _MAX_WARPS),
        )
        if per_token:
            grad_gate = partial_dgate.reshape(gate_shape).to(gate_dtype)
        else:
            grad_gate = partial_dgate.sum(1).reshape(gate_shape).to(gate_dtype)
        return grad_out.to(ctx.x_dtype), grad_y, grad_gate, None


def _check_tokens(name: str, tensor: torch.Tensor) -> None:
    check_float_tensor(name, tensor)
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be [B, L, D], got shape {tuple(tensor.shape)}")


def _check_modulation(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                      eps: float) -> bool:
    """Whether the modulation is per token; shift and scale must agree on it, eps be > 0."""
    per_token = modulation_vector("shift", shift, x)
    if modulation_vector("scale", scale, x) != per_token:
        raise ValueError(
            "shift and scale must both be per sample or both per token, got shift "
            f"{tuple(shift.shape)} and scale {tuple(scale.shape)} for x of shape {tuple(x.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return per_token


def layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """`LayerNorm(x) * (1 + scale) + shift`; x [B, L, D], shift and scale both per sample
    ([B, 1, D] or [B, D]) or both per token ([B, L, D])."""
    _check_tokens("x", x)
    per_token = _check_modulation(x, shift, scale, eps)
    if x.numel() == 0:
        return layernorm_modulate_reference(x, shift, scale, eps)
    if use_triton(x):
        return _LayerNormModulateFunction.apply(x, shift, scale, float(eps), per_token)
    return layernorm_modulate_reference(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`x + gate * y`; x, y [B, L, D] (same shape), gate per sample ([B, 1, D] or [B, D])
    or per token ([B, L, D])."""
    _check_tokens("x", x)
    _check_tokens("y", y)
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(
            f"y must match x ({tuple(x.shape)} on {x.device}), "
            f"got {tuple(y.shape)} on {y.device}"
        )
    per_token = modulation_vector("gate", gate, x)
    if x.numel() == 0:
        return gated_residual_reference(x, y, gate)
    if use_triton(x):
        return _GatedResidualFunction.apply(x, y, gate, per_token)
    return gated_residual_reference(x, y, gate)


class LayerNormModulate(torch.nn.Module):
    """Module form of `layernorm_modulate` (no parameters)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return layernorm_modulate(x, shift, scale, self.eps)


class GatedResidual(torch.nn.Module):
    """Module form of `gated_residual` (no parameters)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_residual(x, y, gate)


# -- the gpd:: CPU ops: references (the native library replaces them when built) -----------

def _op_tokens(name: str, x: torch.Tensor) -> None:
    check_float_tensor(name, x)
    check_rank(name, x, 3, "[B, L, D]")


def _compute(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _modulate_fwd_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _op_tokens("x", x)
    _check_modulation(x, shift, scale, eps)
    x_c = x.to(_compute(x))
    mean = x_c.mean(-1)
    rstd = torch.rsqrt((x_c - mean[..., None]).square().mean(-1) + eps)
    out = layernorm_modulate_reference(x, shift, scale, eps).contiguous()
    return out, mean.reshape(-1).float(), rstd.reshape(-1).float()


def _modulate_bwd_op(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                     mean: torch.Tensor, rstd: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _op_tokens("x", x)
    check_same_shape("x", x, grad_out=grad_out)
    per_token = modulation_vector("scale", scale, x)
    rows = x.shape[0] * x.shape[1]
    for name, t in (("mean", mean), ("rstd", rstd)):
        check_float_tensor(name, t)
        if t.shape != (rows,):
            raise ValueError(f"{name} must be the forward's ({rows},) (one per row of x), got "
                             f"{tuple(t.shape)}")
    compute = _compute(x)
    x_hat = (x.to(compute) - mean.view(*x.shape[:2], 1)) * rstd.view(*x.shape[:2], 1)
    go = grad_out.to(compute)
    g = go * (1 + _broadcastable(scale, x).to(compute))
    grad_x = rstd.view(*x.shape[:2], 1) * (
        g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))
    dshift, dscale = go, go * x_hat
    if not per_token:
        dshift, dscale = dshift.sum(1), dscale.sum(1)
    return (grad_x.to(x.dtype), dshift.reshape(scale.shape).to(scale.dtype),
            dscale.reshape(scale.shape).to(scale.dtype))


def _gated_fwd_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    _op_tokens("x", x)
    _op_tokens("y", y)
    check_same_shape("x", x, y=y)
    check_same_device(x=x, y=y)
    modulation_vector("gate", gate, x)
    return gated_residual_reference(x, y, gate).contiguous()


def _gated_bwd_op(grad_out: torch.Tensor, y: torch.Tensor,
                  gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _op_tokens("y", y)
    check_same_shape("y", y, grad_out=grad_out)
    per_token = modulation_vector("gate", gate, y)
    compute = _compute(y)
    go = grad_out.to(compute)
    grad_y = go * _broadcastable(gate, y).to(compute)
    dgate = go * y.to(compute)
    if not per_token:
        dgate = dgate.sum(1)
    return grad_y.to(y.dtype), dgate.reshape(gate.shape).to(gate.dtype)


register_cpu("adaln_modulate_fwd", _modulate_fwd_op)
register_cpu("adaln_modulate_bwd", _modulate_bwd_op)
register_cpu("gated_residual_fwd", _gated_fwd_op)
register_cpu("gated_residual_bwd", _gated_bwd_op)


@torch.library.register_fake("gpd::adaln_modulate_fwd")
def _modulate_fwd_fake(x, shift, scale, eps):
    rows = x.shape[0] * x.shape[1]
    mean = x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), mean, torch.empty_like(mean)


@torch.library.register_fake("gpd::adaln_modulate_bwd")
def _modulate_bwd_fake(grad_out, x, scale, mean, rstd):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(scale),
            torch.empty_like(scale))


@torch.library.register_fake("gpd::gated_residual_fwd")
def _gated_fwd_fake(x, y, gate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("gpd::gated_residual_bwd")
def _gated_bwd_fake(grad_out, y, gate):
    return torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty_like(gate)
