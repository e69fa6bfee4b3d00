"""Fused band-amplitude loss: Triton kernels, launch wrapper, `gpd::band_amplitude_loss_fwd`,
module.

The loss (gpd_kernels.reference.band_amplitude_loss_reference) is, per (sample, channel)
slab, sum over bands b of (||P_b|| - ||Q_b||)^2 / numel, with ||X_b||^2 the energy of the
orthonormal 3D DFT of x in band b (temporal band x spatial ring). No complex arithmetic:
per axis, R_n is the real orthogonal n x n matrix whose row r is the cosine (r <= n / 2) or
the sine (r > n / 2) of FFT bin r, scaled to unit norm. Every band is closed under
k -> n - k on each axis, and the cosine and sine rows of a bin pair carry its energy, so
with u = (R_T x R_H x R_W) x (coefficient u[t, h, w] in the band of FFT bin (t, h, w)):
    ||X_b||^2 = sum of u^2 over band b's coefficients  (Parseval, x^T P_b x),
    d loss / d pred = R^T (s * R p),  s = 2/numel (1 - ||Q_b|| / ||P_b||) on band b,
which is 2/numel sum_b (1 - ||Q_b|| / ||P_b||) P_b p, the reference's gradient (s = 0 where
||P_b|| = 0, the reference's subgradient). The loss is symmetric in pred and target, so the
target's gradient is the same op with the two swapped (the autograd below).

Passes. Each is one axis of R (or R^T) as a tl.dot of the zero-padded R with a tile (tl.dot
needs every dim >= 16), the contraction in 32-wide slices so that registers and shared
memory stay bounded at any axis length; all write a float32 scratch [2, B, C, T, H, W]
(pred's coefficients, then target's), in place after the first:
  1. T (left kernel, [T_PAD, BLOCK_S] tiles over H * W): pred and target into the scratch.
  2. H (left kernel, [H_PAD, BLOCK_S] tiles of each plane): both halves.
  3. W (right kernel, [BLOCK_R, W_PAD] blocks of a slab's T * H rows): both halves, and each
     block's energy per band (12 partials); pred's u is kept when a gradient is wanted.
  4. scale kernel, one program per slab: the block partials summed per band in float64 in a
     fixed order, the slab's loss partial and the band scales s; then freq_loss's loss
     kernel sums the slab partials in float64 (deterministic, as the paper's form).
  5. (gradient) W with s applied as u is loaded, then H, then T with R^T, the last writing
     the float32 gradient.
A band's energy needs its whole slab before any gradient element can be formed, so the
gradient is a second sweep whatever the tiling. One kernel per axis instead of one plane
kernel holding R_H, R_W and a whole plane: that form (this module's first) compiled for
sm_90 to 97 spilled registers at 480p and 512 KB of shared memory at 720p
(benchmarks/kernel_resources.py); these compile without spills at both (benchmarks/RESULTS.md).

Roofline, arithmetic from datasheet rates only (H200: HBM 4.8 TB/s, dense tf32 ~495 TFLOP/s);
nothing here was run on a GPU. The 480p latent [1, 16, 21, 60, 104] has N = 2,096,640
elements, padded per pass to T 32 (x 6,272 columns), H 64 (x 128 columns), W 128 (x 64-row
blocks). Dots with the gradient: T 0.62 GFLOP (pred, target, inverse), H 1.06, W 2.01:
3.69 GFLOP, 7.4 us at peak tf32, 22 us as tf32x3's three tf32 products (below). Memory: the
least is pred and target read once and the gradient written once, 8 B/element in bf16
(16.8 MB, 3.5 us); the passes move 64 B/element if no scratch access hits L2 (forward T
4 + 8, H 8 + 8, W 8 + 4; gradient W, H, T 8 each: 134 MB, 28 us), 82 FLOP/B counting
tf32x3, near the ridge (~100): the dots and the traffic cost about the same and must
overlap. The scratch of one 480p batch-1 call is 16.8 MB, under an H100's L2 (50 MB by its
datasheet), so much of its traffic may stay on chip. So the time should lie between the
3.5 us floor and about 28 + 22 us plus ten launches (six without the gradient);
benchmarks/device_check.sh measures it beside the torch.fft reference.

Dots in tf32x3 (three tf32 products, about fp32's accuracy), not freq_loss.py's tf32: every
term here goes through a dot, and near the optimum the band scale 1 - ||Q_b|| / ||P_b|| is a
small difference of two amplitudes, whose sign tf32's ~5e-4 input rounding could flip in a
band of few bins. The GPU tolerance (1e-4) is a bound to check, not a measured one.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import nn

from ._registry import register_kernels
from .freq_loss import _check_reduction, _loss_kernel
from .reference import (
    SPATIAL_RING_EDGES,
    TEMPORAL_BAND_EDGES,
    band_amplitude_loss_grad_reference,
    band_amplitude_loss_reference,
    band_tables,
    check_latent_pair,
)

OP_NAME = "gpd::band_amplitude_loss_fwd"
DOT_PRECISION = "tf32x3"
RINGS = len(SPATIAL_RING_EDGES)
_BANDS_PAD = 16  # the 3 x 4 bands, padded to a power of two
_MIN_DOT_DIM = 16
_K_SLICE = 32  # contraction slice: registers and shared memory bounded at any axis length
_LEFT_TILE = 4096  # output elements per program of the T and H passes (4 warps)
_RIGHT_TILE = 8192  # of the W pass (8 warps): 32 float32 registers per thread
_FINAL_BLOCK = 1024


def _padded(n: int) -> int:
    return max(_MIN_DOT_DIM, triton.next_power_of_2(n))


def real_fourier_basis(n: int) -> torch.Tensor:
    """R_n [n, n] float64: row r the unit-norm cosine (r <= n / 2) or sine (r > n / 2) of
    FFT bin r; orthogonal."""
    r = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    angle = 2 * math.pi * ((r * j) % n) / n  # the remainder keeps large n accurate
    own_mirror = (r == 0) | (2 * r == n)  # bins 0 and n / 2 are their own k -> n - k
    scale = (2.0 - own_mirror.double()).sqrt() / math.sqrt(n)  # 1 or sqrt(2), in float64
    return scale * torch.where(2 * r <= n, torch.cos(angle), torch.sin(angle))


@functools.lru_cache(maxsize=64)
def _basis_on(n: int, device: torch.device) -> torch.Tensor:
    """R_n zero-padded to [pad, pad] float32 on device, made once per size (a captured
    step may not copy from the host; its eager warm-up fills this)."""
    pad = _padded(n)
    padded = torch.zeros(pad, pad, dtype=torch.float64)
    padded[:n, :n] = real_fourier_basis(n)
    return padded.to(device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=16)
def _tables_on(t: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first band of each frame's temporal band [T], ring [H, W]), int32 on device."""
    temporal, ring = band_tables(t, h, w)
    return ((temporal * RINGS).to(device=device, dtype=torch.int32),
            ring.to(device=device, dtype=torch.int32))


@triton.jit
def _band_left_kernel(src_ptr, dst_ptr, basis_ptr, N: tl.constexpr, INNER: tl.constexpr,
                      N_PAD: tl.constexpr, BLOCK_S: tl.constexpr, COL_BLOCKS: tl.constexpr,
                      K_SLICE: tl.constexpr, TRANSPOSE: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """dst = R @ src (R^T @ src when TRANSPOSE) along the middle axis of [outer, N, INNER], on
    one [N_PAD, BLOCK_S] tile. The contraction runs in K_SLICE slices: registers stay bounded
    at any N, and every read of the tile precedes its write, so dst may be src."""
    item = tl.program_id(0)
    base = tl.cast(item // COL_BLOCKS, tl.int64) * (N * INNER)
    index = tl.arange(0, N_PAD)
    cols = (item % COL_BLOCKS) * BLOCK_S + tl.arange(0, BLOCK_S)
    col_ok = cols[None, :] < INNER
    acc = tl.zeros((N_PAD, BLOCK_S), dtype=tl.float32)
    for k in range(0, N, K_SLICE):
        ks = k + tl.arange(0, K_SLICE)
        x = tl.load(src_ptr + base + ks[:, None] * INNER + cols[None, :],
                    mask=(ks[:, None] < N) & col_ok, other=0.0).to(tl.float32)
        if TRANSPOSE:  # R^T[i, k] = R[k, i]
            basis = tl.load(basis_ptr + ks[None, :] * N_PAD + index[:, None])
        else:
            basis = tl.load(basis_ptr + index[:, None] * N_PAD + ks[None, :])
        acc = tl.dot(basis, x, acc, input_precision=DOT_PRECISION)
    tl.store(dst_ptr + base + index[:, None] * INNER + cols[None, :], acc,
             mask=(index[:, None] < N) & col_ok)


@triton.jit
def _band_right_kernel(coef_ptr, basis_ptr, scale_ptr, energy_ptr, temporal_ptr, ring_ptr,
                       stored_slabs, ROWS: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                       W_PAD: tl.constexpr, BLOCK_R: tl.constexpr, ROW_BLOCKS: tl.constexpr,
                       K_SLICE: tl.constexpr, RINGS: tl.constexpr,
                       TEMPORAL_BANDS: tl.constexpr, BANDS_PAD: tl.constexpr,
                       INVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Along W, in place, on [BLOCK_R, W_PAD] row blocks of one slab's [T * H, W] rows.
    Forward: u = x @ R_W^T, this block's energy per band, u kept for slabs below
    stored_slabs. Inverse: (s * u) @ R_W, s the slab's band scales."""
    item = tl.program_id(0)
    slab = item // ROW_BLOCKS
    rows = (item % ROW_BLOCKS) * BLOCK_R + tl.arange(0, BLOCK_R)  # t * H + h in the slab
    row_ok = rows < ROWS
    base = tl.cast(slab, tl.int64) * (ROWS * W)
    cols = tl.arange(0, W_PAD)
    first_band = tl.load(temporal_ptr + rows // H, mask=row_ok, other=0)  # the frame's band
    heights = rows % H
    acc = tl.zeros((BLOCK_R, W_PAD), dtype=tl.float32)
    for k in range(0, W, K_SLICE):
        ks = k + tl.arange(0, K_SLICE)
        part_ok = row_ok[:, None] & (ks[None, :] < W)
        x = tl.load(coef_ptr + base + rows[:, None] * W + ks[None, :], mask=part_ok, other=0.0)
        if INVERSE:
            ring = tl.load(ring_ptr + heights[:, None] * W + ks[None, :], mask=part_ok, other=0)
            x *= tl.load(scale_ptr + slab * BANDS_PAD + first_band[:, None] + ring, mask=part_ok,
                         other=0.0)
            basis = tl.load(basis_ptr + ks[:, None] * W_PAD + cols[None, :])
        else:  # R_W^T[k, j] = R_W[j, k]
            basis = tl.load(basis_ptr + cols[None, :] * W_PAD + ks[:, None])
        acc = tl.dot(x, basis, acc, input_precision=DOT_PRECISION)
    offsets = base + rows[:, None] * W + cols[None, :]
    if INVERSE:
        tl.store(coef_ptr + offsets, acc, mask=row_ok[:, None] & (cols[None, :] < W))
    else:
        ok = row_ok[:, None] & (cols[None, :] < W)
        ring = tl.load(ring_ptr + heights[:, None] * W + cols[None, :], mask=ok, other=0)
        power = acc * acc  # 0 outside the slab's rows and columns
        for r in tl.static_range(RINGS):
            per_row = tl.sum(tl.where(ring == r, power, 0.0), axis=1)
            for band in tl.static_range(TEMPORAL_BANDS):
                tl.store(energy_ptr + item * BANDS_PAD + band * RINGS + r,
                         tl.sum(tl.where(first_band == band * RINGS, per_row, 0.0)))
        kept_rows = tl.where(slab < stored_slabs, ROWS, 0)  # a tensor mask, not a scalar one
        tl.store(coef_ptr + offsets, acc, mask=(rows[:, None] < kept_rows) & (cols[None, :] < W))


@triton.jit
def _band_scale_kernel(energy_ptr, scale_ptr, partial_ptr, slabs, grad_scale,
                       ROW_BLOCKS: tl.constexpr, BLOCKS_PAD: tl.constexpr,
                       BANDS: tl.constexpr, BANDS_PAD: tl.constexpr):
    """One slab: band energies (its row blocks' partials summed in float64 in a fixed order),
    its loss partial and band scales."""
    slab = tl.program_id(0)
    blocks = tl.arange(0, BLOCKS_PAD)
    bands = tl.arange(0, BANDS_PAD)
    ok = (blocks[:, None] < ROW_BLOCKS) & (bands[None, :] < BANDS)
    tile = blocks[:, None] * BANDS_PAD + bands[None, :]
    start = tl.cast(slab, tl.int64) * (ROW_BLOCKS * BANDS_PAD)
    e_pred = tl.load(energy_ptr + start + tile, mask=ok, other=0.0).to(tl.float64)
    e_target = tl.load(energy_ptr + slabs * (ROW_BLOCKS * BANDS_PAD) + start + tile, mask=ok,
                       other=0.0).to(tl.float64)
    amp_pred = tl.sqrt(tl.sum(e_pred, axis=0))
    amp_target = tl.sqrt(tl.sum(e_target, axis=0))
    gap = amp_pred - amp_target
    tl.store(partial_ptr + slab, tl.sum(gap * gap))
    filled = amp_pred > 0  # an empty band of pred: gradient 0 (the reference's subgradient)
    ratio = amp_target / tl.where(filled, amp_pred, 1.0)
    scale = tl.where(filled, grad_scale * (1.0 - ratio), 0.0)
    tl.store(scale_ptr + slab * BANDS_PAD + bands, scale.to(tl.float32))


def _left_config(n: int, inner: int) -> dict:
    n_pad = _padded(n)
    block_s = min(max(_MIN_DOT_DIM, _LEFT_TILE // n_pad), _padded(inner))
    return {"N": n, "INNER": inner, "N_PAD": n_pad, "BLOCK_S": block_s,
            "COL_BLOCKS": triton.cdiv(inner, block_s), "K_SLICE": min(_K_SLICE, n_pad),
            "DOT_PRECISION": DOT_PRECISION, "num_warps": 4}


def kernel_configs(shape: tuple[int, ...]) -> dict[str, dict]:
    """Constexpr arguments and launch options of the T, H and W passes for a
    [B, C, T, H, W] shape (TRANSPOSE / INVERSE are added per launch)."""
    frames, height, width = shape[2:]
    rows, w_pad = frames * height, _padded(width)
    block_r = min(max(_MIN_DOT_DIM, _RIGHT_TILE // w_pad), _padded(rows))
    row_blocks = triton.cdiv(rows, block_r)
    right = {"ROWS": rows, "H": height, "W": width, "W_PAD": w_pad, "BLOCK_R": block_r,
             "ROW_BLOCKS": row_blocks, "K_SLICE": min(_K_SLICE, w_pad), "RINGS": RINGS,
             "TEMPORAL_BANDS": len(TEMPORAL_BAND_EDGES), "BANDS_PAD": _BANDS_PAD,
             "DOT_PRECISION": DOT_PRECISION, "num_warps": 8}
    return {"time": _left_config(frames, height * width), "height": _left_config(height, width),
            "width": right}


def band_amplitude_loss_triton(pred: torch.Tensor, target: torch.Tensor,
                               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1): (float32
    loss, float32 d loss / d pred, or an empty tensor without need_grad). Non-contiguous
    inputs are copied to contiguous ones first; arithmetic is float32 for any input dtype."""
    check_latent_pair(pred, target)
    configs = kernel_configs(pred.shape)
    time, height, width = configs["time"], configs["height"], configs["width"]
    pred, target = pred.contiguous(), target.contiguous()
    batch, channels, frames, rows_h, cols_w = pred.shape
    slabs, device, numel = batch * channels, pred.device, pred.numel()
    basis_t, basis_h, basis_w = (_basis_on(n, device) for n in (frames, rows_h, cols_w))
    temporal, ring = _tables_on(frames, rows_h, cols_w, device)
    coef = torch.empty(2, numel, dtype=torch.float32, device=device)  # pred's, then target's
    for side, x in enumerate((pred, target)):
        _band_left_kernel[(slabs * time["COL_BLOCKS"],)](x, coef[side], basis_t,
                                                         TRANSPOSE=False, **time)
    planes = slabs * frames
    _band_left_kernel[(2 * planes * height["COL_BLOCKS"],)](coef, coef, basis_h,
                                                            TRANSPOSE=False, **height)
    row_blocks = width["ROW_BLOCKS"]
    energy = torch.empty(2 * slabs * row_blocks * _BANDS_PAD, dtype=torch.float32,
                         device=device)
    scale = torch.empty(slabs * _BANDS_PAD, dtype=torch.float32, device=device)
    _band_right_kernel[(2 * slabs * row_blocks,)](coef, basis_w, scale, energy, temporal, ring,
                                                  slabs if need_grad else 0, INVERSE=False,
                                                  **width)
    partials = torch.empty(slabs, dtype=torch.float64, device=device)
    _band_scale_kernel[(slabs,)](energy, scale, partials, slabs, 2.0 / numel,
                                 ROW_BLOCKS=row_blocks,
                                 BLOCKS_PAD=triton.next_power_of_2(row_blocks),
                                 BANDS=len(TEMPORAL_BAND_EDGES) * RINGS, BANDS_PAD=_BANDS_PAD)
    loss = torch.empty((), dtype=torch.float32, device=device)
    _loss_kernel[(1,)](partials, loss, slabs, numel, BLOCK=_FINAL_BLOCK)
    if not need_grad:
        return loss, torch.empty(0, dtype=torch.float32, device=device)
    # The gradient R^T (s * u) from pred's coefficients, W first (where s is applied).
    _band_right_kernel[(slabs * row_blocks,)](coef, basis_w, scale, energy, temporal, ring,
                                              slabs, INVERSE=True, **width)
    _band_left_kernel[(planes * height["COL_BLOCKS"],)](coef, coef, basis_h, TRANSPOSE=True,
                                                        **height)
    grad = torch.empty(pred.shape, dtype=torch.float32, device=device)
    _band_left_kernel[(slabs * time["COL_BLOCKS"],)](coef, grad, basis_t, TRANSPOSE=True,
                                                     **time)
    return loss, grad


def _band_amplitude_loss_cpu(pred, target, need_grad):
    """The reference backend's CPU kernel (without the native library): torch.fft."""
    if not need_grad:
        loss = band_amplitude_loss_reference(pred.detach(), target.detach())
        return loss.to(torch.float32), pred.new_empty(0, dtype=torch.float32)
    loss, grad = band_amplitude_loss_grad_reference(pred, target)
    return loss.to(torch.float32), grad.to(torch.float32)


register_kernels("band_amplitude_loss_fwd", _band_amplitude_loss_cpu, band_amplitude_loss_triton)


@torch.library.register_fake(OP_NAME)
def _band_amplitude_loss_fake(pred, target, need_grad):
    check_latent_pair(pred, target)
    grad_shape = pred.shape if need_grad else (0,)
    return (pred.new_empty((), dtype=torch.float32),
            pred.new_empty(grad_shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    pred, target, _ = inputs
    ctx.save_for_backward(pred, target, output[1])


def _backward(ctx, grad_loss, _grad_of_grad_output):
    """Scale the gradient the forward produced. The loss is symmetric in its inputs, so the
    target's gradient is the op's with the two swapped (one more forward, only when asked)."""
    pred, target, grad = ctx.saved_tensors
    grad_pred = grad_target = None
    if ctx.needs_input_grad[0]:
        if grad.numel() == 0:  # the forward ran with need_grad=False
            grad = torch.ops.gpd.band_amplitude_loss_fwd(pred, target, True)[1]
        grad_pred = (grad * grad_loss).to(pred.dtype)
    if ctx.needs_input_grad[1]:
        swapped = torch.ops.gpd.band_amplitude_loss_fwd(target, pred, True)[1]
        grad_target = (swapped * grad_loss).to(target.dtype)
    return grad_pred, grad_target, None


torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)


def band_amplitude_loss(pred: torch.Tensor, target: torch.Tensor,
                        reduction: str = "mean") -> torch.Tensor:
    """Squared band-amplitude difference of [B, C, T, H, W] latents (the reference's
    definition). "mean" divides by numel; "sum" does not. Differentiable w.r.t. both inputs;
    the forward kernel produces pred's gradient only when one is needed."""
    _check_reduction(reduction)
    check_latent_pair(pred, target)
    need_grad = torch.is_grad_enabled() and pred.requires_grad
    loss, _ = torch.ops.gpd.band_amplitude_loss_fwd(pred, target, need_grad)
    return loss if reduction == "mean" else loss * pred.numel()


class BandAmplitudeLoss(nn.Module):
    """Module form of `band_amplitude_loss`."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return band_amplitude_loss(pred, target, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
