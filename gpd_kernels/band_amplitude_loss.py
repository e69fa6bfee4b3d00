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

Passes (each transform a tl.dot with the zero-padded R on power-of-two tiles; tl.dot needs
every dim >= 16):
  1. time kernel, once for pred and once for target: R_T @ x over [T_PAD, BLOCK_S] tiles of
     each slab, into a float32 scratch [2, B, C, T, H, W].
  2. plane kernel over every (input, b, c, t) plane: u = R_H z R_W^T, the energy of each
     spatial ring of the plane (4 partials), and u kept in place for pred when a gradient is
     wanted.
  3. band kernel, one program per slab: the plane partials summed per band in float64 in a
     fixed order, the slab's loss partial and the band scales s; then freq_loss's loss
     kernel sums the slab partials in float64 (deterministic, as the paper's form).
  4. (gradient) plane kernel in inverse mode: R_H^T (s u) R_W in place, then the time kernel
     with R_T^T writes the float32 gradient.
A band's energy needs its whole slab before any gradient element can be formed, so the
gradient is a second pass over the coefficients whatever the tiling.

Roofline, arithmetic from datasheet rates only (H200: HBM 4.8 TB/s, dense tf32 ~495 TFLOP/s);
nothing here was run on a GPU. The 480p latent [1, 16, 21, 60, 104] has N = 2,096,640
elements, padded to T_PAD 32, H_PAD 64, W_PAD 128. Dots: the time kernel 2 T_PAD = 64 FLOP
per padded tile element (1.53 N of them, three times: pred, target, inverse), 0.62 GFLOP;
a plane 2 (64 x 128 x 128 + 64 x 64 x 128) = 3.15 MFLOP, 1,008 planes (672 forward, 336
inverse), 3.17 GFLOP; 3.79 GFLOP in all, 7.7 us at peak tf32, 23 us as the three tf32
passes of tf32x3 (below). Memory: the least is pred and
target read once and the gradient written once, 8 B/element in bf16 (16.8 MB, 3.5 us); the
passes move 40 B/element if no scratch access hits L2 (inputs 4, time pass writes 8, plane
pass reads 8 and writes 4, inverse plane 4 + 4, inverse time 4 + 4: 83.9 MB, 17.5 us), about
45 FLOP/B (135 counting tf32x3's three passes, against a ridge of ~100): the dots and the
traffic cost about the same, so they must overlap. The scratch of one 480p batch-1 call is
16.8 MB, so on a GPU whose L2 holds it much of that traffic may stay on chip; each plane
program also reads R_H and R_W (80 KB, 82.6 MB of L2 reads over the 1,008 planes: a
persistent grid as freq_loss.py's would cut that, not done). So the time should lie between
the 3.5 us floor and the sum of 17.5 us of traffic at HBM rate, 23 us of dots and seven
launches (five without the gradient); benchmarks/device_check.sh measures it beside the
torch.fft reference.
Not done: the plane kernel holds a whole padded plane and both operators, so planes over
128 x 128 padded (the 720p latent's 90 x 160) are likely to exceed shared memory on a GPU;
freq_loss.py streams operator slices there, this kernel does not yet (the interpreter and
the native op take any size).

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
_TIME_TILE = 4096
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
def _time_kernel(src_ptr, dst_ptr, basis_ptr, T: tl.constexpr, HW: tl.constexpr,
                 T_PAD: tl.constexpr, BLOCK_S: tl.constexpr, COL_BLOCKS: tl.constexpr,
                 TRANSPOSE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dst = R_T @ src (R_T^T @ src when TRANSPOSE) on one [T_PAD, BLOCK_S] tile of a slab."""
    item = tl.program_id(0)
    base = tl.cast(item // COL_BLOCKS, tl.int64) * (T * HW)
    times = tl.arange(0, T_PAD)
    cols = (item % COL_BLOCKS) * BLOCK_S + tl.arange(0, BLOCK_S)
    tile = base + times[:, None] * HW + cols[None, :]
    tile_ok = (times[:, None] < T) & (cols[None, :] < HW)
    x = tl.load(src_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    if TRANSPOSE:
        basis = tl.load(basis_ptr + times[None, :] * T_PAD + times[:, None])
    else:
        basis = tl.load(basis_ptr + times[:, None] * T_PAD + times[None, :])
    tl.store(dst_ptr + tile, tl.dot(basis, x, input_precision=DOT_PRECISION), mask=tile_ok)


@triton.jit
def _plane_kernel(coef_ptr, energy_ptr, scale_ptr, basis_h_ptr, basis_w_ptr, ring_ptr,
                  temporal_ptr, stored_planes, T: tl.constexpr, H: tl.constexpr,
                  W: tl.constexpr, H_PAD: tl.constexpr, W_PAD: tl.constexpr,
                  RINGS: tl.constexpr, BANDS_PAD: tl.constexpr, INVERSE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One [H, W] plane (flat (input, b, c, t)) of the scratch. Forward: u = R_H z R_W^T,
    its ring energies, u stored in place for planes below stored_planes. Inverse:
    R_H^T (s u) R_W in place, s the plane's band scales."""
    plane = tl.program_id(0)
    rows = tl.arange(0, H_PAD)
    cols = tl.arange(0, W_PAD)
    in_plane = rows[:, None] * W + cols[None, :]
    ok = (rows[:, None] < H) & (cols[None, :] < W)
    offsets = tl.cast(plane, tl.int64) * (H * W) + in_plane
    z = tl.load(coef_ptr + offsets, mask=ok, other=0.0)
    ring = tl.load(ring_ptr + in_plane, mask=ok, other=0)
    if INVERSE:
        band = tl.load(temporal_ptr + plane % T) + ring
        scale = tl.load(scale_ptr + (plane // T) * BANDS_PAD + band, mask=ok, other=0.0)
        basis_h_t = tl.load(basis_h_ptr + rows[None, :] * H_PAD + rows[:, None])
        basis_w = tl.load(basis_w_ptr + cols[:, None] * W_PAD + cols[None, :])
        scaled = tl.dot(basis_h_t, scale * z, input_precision=DOT_PRECISION)
        tl.store(coef_ptr + offsets, tl.dot(scaled, basis_w, input_precision=DOT_PRECISION),
                 mask=ok)
    else:
        basis_h = tl.load(basis_h_ptr + rows[:, None] * H_PAD + rows[None, :])
        basis_w_t = tl.load(basis_w_ptr + cols[None, :] * W_PAD + cols[:, None])
        mixed = tl.dot(z, basis_w_t, input_precision=DOT_PRECISION)
        u = tl.dot(basis_h, mixed, input_precision=DOT_PRECISION)
        power = u * u  # padded rows and columns are 0: the operators' padding is 0
        for r in tl.static_range(RINGS):
            tl.store(energy_ptr + plane * RINGS + r, tl.sum(tl.where(ring == r, power, 0.0)))
        kept_rows = tl.where(plane < stored_planes, H, 0)  # a tensor mask, not a scalar one
        tl.store(coef_ptr + offsets, u, mask=(rows[:, None] < kept_rows) & (cols[None, :] < W))


@triton.jit
def _band_kernel(energy_ptr, temporal_ptr, scale_ptr, partial_ptr, slabs, grad_scale,
                 T: tl.constexpr, T_PAD: tl.constexpr, RINGS: tl.constexpr,
                 BANDS_PAD: tl.constexpr):
    """One slab: band energies (float64, fixed order), its loss partial and band scales."""
    slab = tl.program_id(0)
    entries = tl.arange(0, T_PAD * RINGS)  # (frame, ring) of the slab's plane partials
    frame_ok = entries // RINGS < T
    entry_band = tl.load(temporal_ptr + entries // RINGS, mask=frame_ok, other=0) + entries % RINGS
    bands = tl.arange(0, BANDS_PAD)
    hit = (bands[:, None] == entry_band[None, :]) & frame_ok[None, :]
    start = tl.cast(slab, tl.int64) * (T * RINGS)
    e_pred = tl.load(energy_ptr + start + entries, mask=frame_ok, other=0.0).to(tl.float64)
    e_target = tl.load(energy_ptr + slabs * (T * RINGS) + start + entries, mask=frame_ok,
                       other=0.0).to(tl.float64)
    amp_pred = tl.sqrt(tl.sum(tl.where(hit, e_pred[None, :], 0.0), axis=1))
    amp_target = tl.sqrt(tl.sum(tl.where(hit, e_target[None, :], 0.0), axis=1))
    gap = amp_pred - amp_target
    tl.store(partial_ptr + slab, tl.sum(gap * gap))
    filled = amp_pred > 0  # an empty band of pred: gradient 0 (the reference's subgradient)
    ratio = amp_target / tl.where(filled, amp_pred, 1.0)
    scale = tl.where(filled, grad_scale * (1.0 - ratio), 0.0)
    tl.store(scale_ptr + slab * BANDS_PAD + bands, scale.to(tl.float32))


def kernel_configs(shape: tuple[int, ...]) -> tuple[dict, dict]:
    """Constexpr arguments and launch options of the time and plane kernels for a
    [B, C, T, H, W] shape (TRANSPOSE / INVERSE are added per launch)."""
    frames, height, width = shape[2:]
    t_pad = _padded(frames)
    block_s = max(_MIN_DOT_DIM, _TIME_TILE // t_pad)
    time = {"T": frames, "HW": height * width, "T_PAD": t_pad, "BLOCK_S": block_s,
            "COL_BLOCKS": triton.cdiv(height * width, block_s), "DOT_PRECISION": DOT_PRECISION,
            "num_warps": 4}
    plane = {"T": frames, "H": height, "W": width, "H_PAD": _padded(height),
             "W_PAD": _padded(width), "RINGS": RINGS, "BANDS_PAD": _BANDS_PAD,
             "DOT_PRECISION": DOT_PRECISION, "num_warps": 8}
    return time, plane


def band_amplitude_loss_triton(pred: torch.Tensor, target: torch.Tensor,
                               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1): (float32
    loss, float32 d loss / d pred, or an empty tensor without need_grad). Non-contiguous
    inputs are copied to contiguous ones first; arithmetic is float32 for any input dtype."""
    check_latent_pair(pred, target)
    time, plane = kernel_configs(pred.shape)
    pred, target = pred.contiguous(), target.contiguous()
    batch, channels, frames, height, width = pred.shape
    slabs, device, numel = batch * channels, pred.device, pred.numel()
    basis_t, basis_h, basis_w = (_basis_on(n, device) for n in (frames, height, width))
    temporal, ring = _tables_on(frames, height, width, device)
    coef = torch.empty(2, numel, dtype=torch.float32, device=device)
    for side, x in enumerate((pred, target)):
        _time_kernel[(slabs * time["COL_BLOCKS"],)](x, coef[side], basis_t, TRANSPOSE=False,
                                                    **time)
    planes = slabs * frames
    energy = torch.empty(2 * planes * RINGS, dtype=torch.float32, device=device)
    scale = torch.empty(slabs * _BANDS_PAD, dtype=torch.float32, device=device)
    _plane_kernel[(2 * planes,)](coef, energy, scale, basis_h, basis_w, ring, temporal,
                                 planes if need_grad else 0, INVERSE=False, **plane)
    partials = torch.empty(slabs, dtype=torch.float64, device=device)
    _band_kernel[(slabs,)](energy, temporal, scale, partials, slabs, 2.0 / numel, T=frames,
                           T_PAD=time["T_PAD"], RINGS=RINGS, BANDS_PAD=_BANDS_PAD)
    loss = torch.empty((), dtype=torch.float32, device=device)
    _loss_kernel[(1,)](partials, loss, slabs, numel, BLOCK=_FINAL_BLOCK)
    if not need_grad:
        return loss, torch.empty(0, dtype=torch.float32, device=device)
    _plane_kernel[(planes,)](coef, energy, scale, basis_h, basis_w, ring, temporal, planes,
                             INVERSE=True, **plane)
    grad = torch.empty(pred.shape, dtype=torch.float32, device=device)
    _time_kernel[(slabs * time["COL_BLOCKS"],)](coef[0], grad, basis_t, TRANSPOSE=True, **time)
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
