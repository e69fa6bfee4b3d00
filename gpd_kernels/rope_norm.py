"""Fused q/k RMSNorm + rotary position embedding (Wan's 3D RoPE) for DiT attention.

`rms_norm_rope(x, weight, cos, sin)` with x `[B, L, H, Dh]`: RMSNorm over the whole
`H * Dh` row (Wan normalises q and k across heads) with a learned weight, then rotates
each adjacent pair `(x[2j], x[2j+1])` of every head by the token's angle:
`(a, b) -> (a cos - b sin, a sin + b cos)`, the real form of Wan's complex product.
The 3D structure lives in the tables: `cos`/`sin` are `[L, Dh/2]` per token (the
caller concatenates the time/height/width angle bands), shared by all heads.

Forward and backward are Triton kernels (math in fp32, output in x's dtype); the
tables are constants (no gradient flows to them). Plain CPU calls and float64 inputs
use the reference (launch rules: `_launch`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_float_tensor
from ._launch import num_warps, rows_per_program, use_triton

__all__ = ["RMSNormRoPE", "rms_norm_rope", "rms_norm_rope_reference"]

_MAX_WARPS = 8


@triton.jit
def _pairs(tile, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """[BLOCK_H, 2 * BLOCK_P] -> the even and odd elements of each head, [BLOCK_H, BLOCK_P]
    each. Tiles are loaded and stored whole, contiguous along the head dim, so the loads
    and stores vectorise (a stride-2 gather of the pairs would move one element per
    instruction); the pairs are split and joined in registers."""
    return tl.split(tl.reshape(tile, [BLOCK_H, BLOCK_P, 2]))


@triton.jit
def _interleave(even, odd, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Inverse of `_pairs`."""
    return tl.reshape(tl.join(even, odd), [BLOCK_H, 2 * BLOCK_P])


@triton.jit
def _rms_norm_rope_fwd_kernel(
    x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr,
    seq_len, heads, head_dim, half_dim, eps,
    x_stride_b, x_stride_l, table_stride_l, table_stride_p,
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * dim passes 2**31 for big 480p batches
    token = row % seq_len
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, 2 * BLOCK_P)
    p = tl.arange(0, BLOCK_P)
    mask = (h < heads)[:, None] & (d < head_dim)[None, :]
    offsets = h[:, None] * head_dim + d[None, :]
    x_row = x_ptr + (row // seq_len) * x_stride_b + token * x_stride_l
    x = tl.load(x_row + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (heads * head_dim) + eps)
    weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    na, nb = _pairs(x * rstd * weight, BLOCK_H, BLOCK_P)
    table = token * table_stride_l + p * table_stride_p
    cos = tl.load(cos_ptr + table, mask=p < half_dim, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + table, mask=p < half_dim, other=0.0).to(tl.float32)[None, :]
    out = _interleave(na * cos - nb * sin, na * sin + nb * cos, BLOCK_H, BLOCK_P)
    tl.store(out_ptr + row * heads * head_dim + offsets,
             out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_rope_bwd_kernel(
    grad_out_ptr, x_ptr, weight_ptr, cos_ptr, sin_ptr, rstd_ptr,
    grad_x_ptr, partial_dweight_ptr,
    total_rows, seq_len, heads, head_dim, half_dim, rows_per_prog,
    x_stride_b, x_stride_l, table_stride_l, table_stride_p,
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # A program walks a chunk of rows; the weight gradient is summed in registers and
    # its per-program partials are added afterwards.
    chunk = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, 2 * BLOCK_P)
    p = tl.arange(0, BLOCK_P)
    mask = (h < heads)[:, None] & (d < head_dim)[None, :]
    offsets = h[:, None] * head_dim + d[None, :]
    row_size = heads * head_dim
    weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK_H, 2 * BLOCK_P], dtype=tl.float32)
    start = chunk * rows_per_prog
    stop = tl.minimum(start + rows_per_prog, total_rows)
    for row in range(start, stop):
        token = row % seq_len
        x_row = x_ptr + (row // seq_len) * x_stride_b + token * x_stride_l
        table = token * table_stride_l + p * table_stride_p
        cos = tl.load(cos_ptr + table, mask=p < half_dim, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + table, mask=p < half_dim, other=0.0).to(tl.float32)[None, :]
        grad = tl.load(grad_out_ptr + row * row_size + offsets, mask=mask, other=0.0)
        ga, gb = _pairs(grad.to(tl.float32), BLOCK_H, BLOCK_P)
        # The rotation is orthogonal: its backward is the rotation by -angle.
        d_normed = _interleave(ga * cos + gb * sin, gb * cos - ga * sin, BLOCK_H, BLOCK_P)
        rstd = tl.load(rstd_ptr + row)
        x_hat = tl.load(x_row + offsets, mask=mask, other=0.0).to(tl.float32) * rstd
        dweight += d_normed * x_hat
        d_x_hat = d_normed * weight
        proj = tl.sum(tl.sum(d_x_hat * x_hat, axis=1), axis=0) / row_size
        tl.store(grad_x_ptr + row * row_size + offsets,
                 ((d_x_hat - x_hat * proj) * rstd).to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_dweight_ptr + chunk * row_size + offsets, dweight, mask=mask)


def rms_norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """PyTorch reference in at least fp32 (pass float64 inputs for an exact check)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    batch, seq_len, heads, head_dim = x.shape
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=(-2, -1), keepdim=True) + eps)
    normed = xf * rstd * weight.to(compute).view(heads, head_dim)
    a, b = normed[..., 0::2], normed[..., 1::2]
    cos = cos.to(compute)[None, :, None, :]
    sin = sin.to(compute)[None, :, None, :]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class _RMSNormRoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        batch, seq_len, heads, head_dim = x.shape
        x_c = _rows_of_contiguous_heads(x)
        weight_c = weight.contiguous()
        cos_c, sin_c = _same_strides(cos, sin)
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        rstd = torch.empty(batch * seq_len, device=x.device, dtype=torch.float32)
        block_h, block_p = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim // 2)
        _rms_norm_rope_fwd_kernel[(batch * seq_len,)](
            x_c, weight_c, cos_c, sin_c, out, rstd,
            seq_len, heads, head_dim, head_dim // 2, eps,
            x_c.stride(0), x_c.stride(1), cos_c.stride(0), cos_c.stride(1),
            BLOCK_H=block_h, BLOCK_P=block_p, num_warps=num_warps(block_h * block_p, _MAX_WARPS),
        )
        ctx.save_for_backward(x_c, weight_c, cos_c, sin_c, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, cos, sin, rstd = ctx.saved_tensors
        batch, seq_len, heads, head_dim = x.shape
        total_rows = batch * seq_len
        rows, chunks = rows_per_program(total_rows, 1, x.device)
        grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        partial = torch.empty(chunks, heads * head_dim, device=x.device, dtype=torch.float32)
        block_h, block_p = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim // 2)
        _rms_norm_rope_bwd_kernel[(chunks,)](
            grad_out.contiguous(), x, weight, cos, sin, rstd, grad_x, partial,
            total_rows, seq_len, heads, head_dim, head_dim // 2, rows,
            x.stride(0), x.stride(1), cos.stride(0), cos.stride(1),
            BLOCK_H=block_h, BLOCK_P=block_p, num_warps=num_warps(block_h * block_p, _MAX_WARPS),
        )
        return grad_x, partial.sum(0).to(weight.dtype), None, None, None


def _rows_of_contiguous_heads(x: torch.Tensor) -> torch.Tensor:
    """x itself when each token's [H, Dh] block is dense (e.g. q sliced out of a fused qkv
    projection), else a contiguous copy: the kernels take batch/token strides only."""
    heads, head_dim = x.shape[2:]
    if x.stride(3) == 1 and x.stride(2) == head_dim:
        return x
    return x.contiguous()


def _same_strides(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables as given when they share strides (e.g. the real and imaginary views of a
    complex table), else contiguous copies."""
    if cos.stride() == sin.stride():
        return cos, sin
    return cos.contiguous(), sin.contiguous()


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """RMSNorm over heads*head_dim (with weight), then RoPE on adjacent pairs.

    x [B, L, H, Dh] (Dh even), weight [H*Dh], cos/sin [L, Dh/2]; returns x's shape/dtype.
    """
    for name, tensor in (("x", x), ("weight", weight), ("cos", cos), ("sin", sin)):
        check_float_tensor(name, tensor)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, L, H, Dh], got shape {tuple(x.shape)}")
    batch, seq_len, heads, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"head_dim (x.shape[3]) must be even for RoPE pairs, got {head_dim}")
    if tuple(weight.shape) != (heads * head_dim,):
        raise ValueError(f"weight must be [{heads * head_dim}] (H*Dh), got {tuple(weight.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (seq_len, head_dim // 2):
            raise ValueError(
                f"{name} must be [{seq_len}, {head_dim // 2}] (L, Dh/2), got {tuple(table.shape)}"
            )
    for name, other in (("weight", weight), ("cos", cos), ("sin", sin)):
        if other.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x, got {other.device}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if x.numel() == 0 or not use_triton(x):
        return rms_norm_rope_reference(x, weight, cos, sin, eps)
    return _RMSNormRoPEFunction.apply(x, weight, cos, sin, float(eps))


class RMSNormRoPE(torch.nn.Module):
    """RMSNorm (learned weight over H*Dh) fused with RoPE; tables passed per call."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rms_norm_rope(x, self.weight, cos, sin, self.eps)
