"""Fused latent frequency loss: Triton kernels, launch wrapper, `gpd::freq_loss_fwd`, module.

The weight w is a sum of per-axis terms, so by Parseval (orthonormal FFT)
    loss * numel = ||d||^2 + alpha_s/2 (d . A_H d + d . A_W d) + alpha_t d . A_T d,
    grad = 2/numel (d + alpha_s/2 (A_H d + A_W d) + alpha_t A_T d),
where A_X is the real symmetric circulant matrix with eigenvalues f_X(k)^gamma applied
along axis X. No complex arithmetic: three small matrix products per element, done
with tl.dot on zero-padded power-of-two tiles (tl.dot needs every dim >= 16).

Two launches: a plane kernel (a block of rows of one [H, W] plane per program:
identity, H and W terms) writes the gradient, then a time kernel (a [T, spatial block]
tile per program: the T term) adds into it. Each writes one partial loss per program;
the host sums them in float64, so the result does not depend on scheduling.
Traffic: the time kernel reads the inputs again and updates the gradient, so if those
reads miss L2 the pair moves ~2.5x the bytes of one pass (bf16 in, fp32 grad); launch
groups of slabs (`slabs_per_launch`) are the lever to keep them in L2.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import nn

from ._checks import check_loss_params
from ._registry import register_kernels
from .reference import (
    DEFAULT_ALPHA_S,
    DEFAULT_ALPHA_T,
    DEFAULT_GAMMA,
    axis_frequency,
    check_freq_loss_inputs,
    freq_loss_grad_reference,
)

OP_NAME = "gpd::freq_loss_fwd"
# tf32 keeps the dots on tensor cores; the identity term (||d||^2, d) stays exact fp32,
# so only the alpha-weighted terms carry tf32 rounding (~1e-3 relative at worst).
DOT_PRECISION = "tf32"
_MIN_DOT_DIM = 16
_MAX_CONTRACTION = 32
_TILE_ELEMENTS = 4096


def _padded(n: int) -> int:
    return max(_MIN_DOT_DIM, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=64)
def axis_operator(n: int, gamma: float, device: torch.device) -> torch.Tensor:
    """A_X zero-padded to [pad, pad] float32.

    A[i, j] = (1/n) sum_k f(k)^gamma exp(2 pi i k (i - j) / n), a real circulant.
    """
    eigenvalues = axis_frequency(n, torch.float64).pow(gamma)
    first_column = torch.fft.ifft(eigenvalues).real  # real: f(k) = f(n - k)
    index = torch.arange(n)
    dense = first_column[(index[:, None] - index[None, :]) % n]
    pad = _padded(n)
    padded = torch.zeros(pad, pad, dtype=torch.float64)
    padded[:n, :n] = dense
    return padded.to(device=device, dtype=torch.float32)


@triton.jit
def _load_difference(pred_ptr, target_ptr, offsets, mask):
    pred = tl.load(pred_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return pred - target


@triton.jit
def _freq_plane_kernel(pred_ptr, target_ptr, grad_ptr, partial_ptr, a_h_ptr, a_w_ptr,
                       H, W, half_alpha_s, grad_scale,
                       H_PAD: tl.constexpr, W_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                       K_H: tl.constexpr, K_W: tl.constexpr, NEED_GRAD: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    plane = tl.program_id(0)  # flat (b, c, t)
    row_block = tl.program_id(1)
    base = plane.to(tl.int64) * H * W
    rows = row_block * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, W_PAD)
    row_ok = rows[:, None] < H
    col_ok = cols[None, :] < W
    tile = base + rows[:, None] * W + cols[None, :]
    d = _load_difference(pred_ptr, target_ptr, tile, row_ok & col_ok)

    mixed = tl.zeros((BLOCK_H, W_PAD), dtype=tl.float32)
    for k in range(0, W, K_W):  # d[rows, :] @ A_W
        ks = k + tl.arange(0, K_W)
        d_part = _load_difference(pred_ptr, target_ptr, base + rows[:, None] * W + ks[None, :],
                                  row_ok & (ks[None, :] < W))
        a_part = tl.load(a_w_ptr + ks[:, None] * W_PAD + cols[None, :])
        mixed += tl.dot(d_part, a_part, input_precision=DOT_PRECISION)
    for k in range(0, H, K_H):  # A_H[rows, :] @ d
        ks = k + tl.arange(0, K_H)
        a_part = tl.load(a_h_ptr + rows[:, None] * H_PAD + ks[None, :])
        d_part = _load_difference(pred_ptr, target_ptr, base + ks[:, None] * W + cols[None, :],
                                  (ks[:, None] < H) & col_ok)
        mixed += tl.dot(a_part, d_part, input_precision=DOT_PRECISION)

    weighted = d + half_alpha_s * mixed
    tl.store(partial_ptr + plane * tl.num_programs(1) + row_block, tl.sum(d * weighted))
    if NEED_GRAD:
        tl.store(grad_ptr + tile, grad_scale * weighted, mask=row_ok & col_ok)


@triton.jit
def _freq_time_kernel(pred_ptr, target_ptr, grad_ptr, partial_ptr, a_t_ptr,
                      T, HW, alpha_t, grad_scale,
                      T_PAD: tl.constexpr, BLOCK_S: tl.constexpr, K_T: tl.constexpr,
                      NEED_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    slab = tl.program_id(0)  # flat (b, c)
    col_block = tl.program_id(1)
    base = slab.to(tl.int64) * T * HW
    times = tl.arange(0, T_PAD)
    cols = col_block * BLOCK_S + tl.arange(0, BLOCK_S)
    col_ok = cols[None, :] < HW

    mixed = tl.zeros((T_PAD, BLOCK_S), dtype=tl.float32)
    for k in range(0, T, K_T):  # A_T @ d[:, cols]
        ks = k + tl.arange(0, K_T)
        a_part = tl.load(a_t_ptr + times[:, None] * T_PAD + ks[None, :])
        d_part = _load_difference(pred_ptr, target_ptr, base + ks[:, None] * HW + cols[None, :],
                                  (ks[:, None] < T) & col_ok)
        mixed += tl.dot(a_part, d_part, input_precision=DOT_PRECISION)

    tile = base + times[:, None] * HW + cols[None, :]
    tile_ok = (times[:, None] < T) & col_ok
    d = _load_difference(pred_ptr, target_ptr, tile, tile_ok)
    tl.store(partial_ptr + slab * tl.num_programs(1) + col_block, alpha_t * tl.sum(d * mixed))
    if NEED_GRAD:
        grad = tl.load(grad_ptr + tile, mask=tile_ok, other=0.0)
        tl.store(grad_ptr + tile, grad + (grad_scale * alpha_t) * mixed, mask=tile_ok)


def slabs_fitting_in(budget_bytes: int, pred: torch.Tensor, target: torch.Tensor) -> int:
    """How many [T, H, W] slabs' inputs and float32 gradient fit in `budget_bytes`."""
    per_element = pred.element_size() + target.element_size() + 4
    return max(1, budget_bytes // (per_element * math.prod(pred.shape[2:])))


def freq_loss_triton(pred: torch.Tensor, target: torch.Tensor, alpha_s: float, alpha_t: float,
                     gamma: float, need_grad: bool,
                     slabs_per_launch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    Non-contiguous inputs are copied to contiguous ones first. `slabs_per_launch`
    (default: all) runs both kernels over that many [T, H, W] slabs at a time, so that
    the time kernel's second read of inputs and gradient can come from L2, not HBM
    (a variant for the GPU timing to decide; see `slabs_fitting_in`).
    """
    check_freq_loss_inputs(pred, target, alpha_s, alpha_t, gamma)
    pred, target = pred.contiguous(), target.contiguous()
    batch, channels, frames, height, width = pred.shape
    slabs, device, numel = batch * channels, pred.device, pred.numel()
    grad = torch.empty(pred.shape if need_grad else (0,), dtype=torch.float32, device=device)
    grad_scale = 2.0 / numel
    t_pad, h_pad, w_pad = (_padded(n) for n in (frames, height, width))
    block_h = max(_MIN_DOT_DIM, min(h_pad, _TILE_ELEMENTS // w_pad))
    row_blocks = triton.cdiv(height, block_h)
    block_s = max(_MIN_DOT_DIM, _TILE_ELEMENTS // t_pad)
    col_blocks = triton.cdiv(height * width, block_s)
    with_time = alpha_t != 0.0 and (frames > 1 or gamma == 0.0)  # else A_T d is zero
    plane_partials = torch.empty(slabs * frames * row_blocks, dtype=torch.float32, device=device)
    time_partials = torch.empty(slabs * col_blocks if with_time else 0, dtype=torch.float32,
                                device=device)
    operators = [axis_operator(n, gamma, device) for n in (frames, height, width)]

    group = slabs if slabs_per_launch is None else max(1, slabs_per_launch)
    for first in range(0, slabs, group):
        count = min(group, slabs - first)
        pred_part, target_part = (t.view(slabs, -1)[first:first + count] for t in (pred, target))
        grad_part = grad.view(slabs, -1)[first:first + count] if need_grad else grad
        _freq_plane_kernel[(count * frames, row_blocks)](
            pred_part, target_part, grad_part, plane_partials[first * frames * row_blocks:],
            operators[1], operators[2], height, width, alpha_s / 2, grad_scale,
            H_PAD=h_pad, W_PAD=w_pad, BLOCK_H=block_h,
            K_H=min(h_pad, _MAX_CONTRACTION), K_W=min(w_pad, _MAX_CONTRACTION),
            NEED_GRAD=need_grad, DOT_PRECISION=DOT_PRECISION,
            num_warps=8 if block_h * w_pad >= _TILE_ELEMENTS else 4,
        )
        if with_time:
            _freq_time_kernel[(count, col_blocks)](
                pred_part, target_part, grad_part, time_partials[first * col_blocks:],
                operators[0], frames, height * width, alpha_t, grad_scale,
                T_PAD=t_pad, BLOCK_S=block_s, K_T=min(t_pad, _MAX_CONTRACTION),
                NEED_GRAD=need_grad, DOT_PRECISION=DOT_PRECISION, num_warps=8,
            )
    total = plane_partials.sum(dtype=torch.float64) + time_partials.sum(dtype=torch.float64)
    return (total / numel).to(torch.float32), grad


def _freq_loss_cpu(pred, target, alpha_s, alpha_t, gamma, need_grad):
    loss, grad = freq_loss_grad_reference(pred, target, alpha_s, alpha_t, gamma)
    if not need_grad:
        grad = pred.new_empty(0, dtype=torch.float32)
    return loss.to(torch.float32), grad.to(torch.float32)


register_kernels("freq_loss_fwd", _freq_loss_cpu, freq_loss_triton)


@torch.library.register_fake(OP_NAME)
def _freq_loss_fake(pred, target, alpha_s, alpha_t, gamma, need_grad):
    check_freq_loss_inputs(pred, target, alpha_s, alpha_t, gamma)
    grad_shape = pred.shape if need_grad else (0,)
    return (pred.new_empty((), dtype=torch.float32),
            pred.new_empty(grad_shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    pred, target, alpha_s, alpha_t, gamma, _ = inputs
    ctx.loss_params = (alpha_s, alpha_t, gamma)
    ctx.save_for_backward(pred, target, output[1])


def _backward(ctx, grad_loss, _grad_of_grad_output):
    """Scale the gradient the forward produced; the grad output itself is not differentiated."""
    pred, target, grad = ctx.saved_tensors
    if grad.numel() == 0:  # the forward ran with need_grad=False
        grad = torch.ops.gpd.freq_loss_fwd(pred, target, *ctx.loss_params, True)[1]
    scaled = grad * grad_loss
    grad_pred = scaled.to(pred.dtype) if ctx.needs_input_grad[0] else None
    grad_target = (-scaled).to(target.dtype) if ctx.needs_input_grad[1] else None
    return grad_pred, grad_target, None, None, None, None


torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)

_REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def freq_loss(pred: torch.Tensor, target: torch.Tensor, alpha_s: float = DEFAULT_ALPHA_S,
              alpha_t: float = DEFAULT_ALPHA_T, gamma: float = DEFAULT_GAMMA,
              reduction: str = "mean") -> torch.Tensor:
    """Frequency-weighted squared error of [B, C, T, H, W] latents (design section 4).

    "mean" divides sum(w |D|^2) by numel; "sum" does not. Differentiable w.r.t. both
    inputs; the gradient is produced by the forward kernel only when one is needed.
    """
    _check_reduction(reduction)
    check_freq_loss_inputs(pred, target, alpha_s, alpha_t, gamma)
    need_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    loss, _ = torch.ops.gpd.freq_loss_fwd(pred, target, float(alpha_s), float(alpha_t),
                                          float(gamma), need_grad)
    return loss if reduction == "mean" else loss * pred.numel()


class FrequencyLoss(nn.Module):
    """Module form of `freq_loss` with fixed weights."""

    def __init__(self, alpha_s: float = DEFAULT_ALPHA_S, alpha_t: float = DEFAULT_ALPHA_T,
                 gamma: float = DEFAULT_GAMMA, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        check_loss_params(alpha_s, alpha_t, gamma)
        self.alpha_s, self.alpha_t, self.gamma = float(alpha_s), float(alpha_t), float(gamma)
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return freq_loss(pred, target, self.alpha_s, self.alpha_t, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return (f"alpha_s={self.alpha_s}, alpha_t={self.alpha_t}, gamma={self.gamma}, "
                f"reduction={self.reduction!r}")
