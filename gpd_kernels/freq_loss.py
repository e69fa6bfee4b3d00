"""Fused latent frequency loss: Triton kernels, launch wrapper, `gpd::freq_loss_fwd`, module.

The weight w is a sum of per-axis terms, so by Parseval (orthonormal FFT), with d = pred - target,
    loss * numel = ||d||^2 + alpha_s/2 (d . A_H d + d . A_W d) + alpha_t d . A_T d,
    grad = 2/numel (d + alpha_s/2 (A_H d + A_W d) + alpha_t A_T d),
where A_X is the real symmetric circulant matrix with eigenvalues f_X(k)^gamma applied
along axis X. No complex arithmetic: three small matrix products per element, done
with tl.dot on zero-padded power-of-two tiles (tl.dot needs every dim >= 16).

Design against the roofline. The times below are arithmetic from datasheet rates (H200:
HBM 4.8 TB/s, dense tf32 ~495 TFLOP/s), the resources are compiler output
(benchmarks/kernel_resources.py: sm_90, Triton 3.9, compiled, not run; the GPU image has
Triton 3.6); measured times belong in benchmarks/RESULTS.md.
The 480p latent [1, 16, 21, 60, 104] has N = 2,096,640 elements. The least traffic is
pred and target read once and the float32 gradient written once: 8 B/element in bf16
(16.8 MB, 3.5 us; 40% of HBM is 8.7 us), 12 B in fp32. The padded dots cost
2 (W_PAD + H_PAD) = 384 FLOP per padded plane element and 2 T_PAD = 64 per padded
time-tile element: 1.26 GFLOP, ~2.5 us at peak tf32, about 75 FLOP/B against a ridge
of ~100, so the dots must overlap the memory traffic, not follow it.

Why two passes. An element's gradient needs its whole H, W and T lines; a program
holding all three holds a whole [T, H, W] slab (131k elements, 512 KB in fp32 at 480p:
more than an SM's registers and shared memory together), and there would be only 16
such programs at batch 1. So the axes are split over two kernels, and the second reads
what the first touched from L2 (60 MB on an H200):
  1. plane kernel (H and W terms), persistent: one program per SM (132 at any batch),
     each striding over (plane, row block) items (480p batch 1: 336 whole planes, 2-3
     per program). An item's tile (480p: the whole plane, [64, 128] padded) is read
     from HBM once into registers, and the next item's tile is loaded while this one's
     dots run; d @ A_W and A_H @ d take d from registers (wgmma), with no second load;
     A_W and A_H (64 + 16 KB at 480p) are loaded once per program, not per item
     (132 x 80 KB = 10.8 MB of L2 reads per launch instead of 336 x 80 KB). It writes
     grad = 2/N (d + alpha_s/2 (A_H d + A_W d)) and one loss partial per item. Planes
     over one tile (H_PAD * W_PAD > 8192 or H_PAD > 128; the 720p latent's 90 x 160)
     go in row blocks whose H term streams 32-row slices of the plane (L2 hits after
     the first block); W_PAD > 128 streams 32-row slices of A_W.
  2. time kernel (T term): one program per [T_PAD, 4096 / T_PAD] tile of one slab
     (480p: [32, 128], 784 programs at batch 1). It re-reads pred, target and the
     gradient (L2 hits) and rewrites the gradient, whose first write L2 absorbed, so
     HBM sees one write-back.
  3. one program sums the per-item partials in float64 in a fixed order and writes the
     float32 loss: deterministic, independent of the grid and of the launch groups.
Three launches (summing the loss with torch ops instead would take five more). On CUDA
the slabs go in launch groups whose inputs and gradient fit in half the L2
(`slabs_per_launch`): 480p bf16 batch 1 is one group of 16.8 MB, batch 4 three.
Bytes per element: HBM 8 (bf16) / 12 (fp32), the minimum, while a group stays in L2;
L2 traffic 20 / 28 (both passes' reads and writes) plus the operators.
Shared memory per plane program at 480p, tiles x bytes: A_W 64 KB + A_H 16 KB + d as
the B operand of A_H @ d 32 KB = 112 KB; compiled, with the compiler's own staging for
layout conversions, 160 KB for bf16 inputs and 176 KB for fp32 (limit 227 KB), and 198 /
194 registers per thread at 8 warps, no spills: one program per SM, as the persistent
grid intends.
The time kernel: 4 warps, 8 / 16 KB, 124 / 147 registers.
Expected: HBM bytes are the minimum, so the bounds are L2 bandwidth (20 B/element at
roughly twice HBM's rate), the dots overlapping it, and three launches with their
tails: an estimate of 40-60% of HBM at 480p, to be checked by device_check.sh.

Every shape is a tl.constexpr: row strides known to the compiler give 16-byte vector
loads (104 bf16 = 13 x 16 B), at the cost of one compile per latent shape.
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
_K_SLICE = 32  # contraction slice when an operator is too large to keep whole
_MAX_RESIDENT = 128  # an operator up to 128 x 128 float32 (64 KB) is kept whole
_PLANE_TILE = 8192  # elements per plane item: 32 float32 registers per thread at 8 warps
_TIME_TILE = 4096
_CPU_PROGRAMS = 3  # interpreter grid for the persistent kernel: several items per program
_FINAL_BLOCK = 1024


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
def _load_difference(pred_ptr, target_ptr, offsets, mask, EVICTION: tl.constexpr):
    pred = tl.load(pred_ptr + offsets, mask=mask, other=0.0, eviction_policy=EVICTION)
    target = tl.load(target_ptr + offsets, mask=mask, other=0.0, eviction_policy=EVICTION)
    return pred.to(tl.float32) - target.to(tl.float32)


@triton.jit
def _plane_tile(item, items, H: tl.constexpr, W: tl.constexpr, BLOCK_H: tl.constexpr,
                ROW_BLOCKS: tl.constexpr, cols):
    """An item's plane offset (elements), rows, in-plane offsets and mask (off past the end)."""
    base = tl.cast(item // ROW_BLOCKS, tl.int64) * (H * W)
    rows = (item % ROW_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
    valid_rows = tl.where(item < items, H, 0)
    mask = (rows[:, None] < valid_rows) & (cols[None, :] < W)
    return base, rows, rows[:, None] * W + cols[None, :], mask


@triton.jit
def _plane_kernel(pred_ptr, target_ptr, grad_ptr, partial_ptr, a_h_ptr, a_w_ptr, items,
                  half_alpha_s, grad_scale,
                  H: tl.constexpr, W: tl.constexpr, H_PAD: tl.constexpr, W_PAD: tl.constexpr,
                  BLOCK_H: tl.constexpr, ROW_BLOCKS: tl.constexpr, K_SLICE: tl.constexpr,
                  RESIDENT_W: tl.constexpr, NEED_GRAD: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Persistent: items are (plane, row block), plane = flat (b, c, t); H and W terms."""
    cols = tl.arange(0, W_PAD)
    if RESIDENT_W:  # A_W kept whole for the program's lifetime
        a_w = tl.load(a_w_ptr + cols[:, None] * W_PAD + cols[None, :])
    if BLOCK_H == H_PAD:  # whole planes: A_H kept whole too
        h_index = tl.arange(0, H_PAD)
        a_h = tl.load(a_h_ptr + h_index[:, None] * H_PAD + h_index[None, :])
    step = tl.num_programs(0)
    base, rows, offsets, mask = _plane_tile(tl.program_id(0), items, H, W, BLOCK_H,
                                            ROW_BLOCKS, cols)
    pred_next = tl.load(pred_ptr + base + offsets, mask=mask, other=0.0)
    target_next = tl.load(target_ptr + base + offsets, mask=mask, other=0.0)
    for item in range(tl.program_id(0), items, step):
        base, rows, offsets, mask = _plane_tile(item, items, H, W, BLOCK_H, ROW_BLOCKS, cols)
        d = pred_next.to(tl.float32) - target_next.to(tl.float32)
        # The next item's inputs load while this item's dots run (one item in flight).
        next_base, _, next_offsets, next_mask = _plane_tile(item + step, items, H, W, BLOCK_H,
                                                            ROW_BLOCKS, cols)
        pred_next = tl.load(pred_ptr + next_base + next_offsets, mask=next_mask, other=0.0)
        target_next = tl.load(target_ptr + next_base + next_offsets, mask=next_mask, other=0.0)
        pred_plane, target_plane = pred_ptr + base, target_ptr + base
        row_ok = rows[:, None] < H
        if RESIDENT_W:  # d[rows, :] @ A_W, d from registers
            mixed = tl.dot(d, a_w, input_precision=DOT_PRECISION)
        else:  # column slices of d (L1 hits: this program just loaded them)
            mixed = tl.zeros((BLOCK_H, W_PAD), dtype=tl.float32)
            for k in range(0, W, K_SLICE):
                ks = k + tl.arange(0, K_SLICE)
                d_part = _load_difference(pred_plane, target_plane, rows[:, None] * W + ks[None, :],
                                          row_ok & (ks[None, :] < W), "")
                a_part = tl.load(a_w_ptr + ks[:, None] * W_PAD + cols[None, :])
                mixed = tl.dot(d_part, a_part, mixed, input_precision=DOT_PRECISION)
        if BLOCK_H == H_PAD:  # A_H @ d, d from registers
            mixed = tl.dot(a_h, d, mixed, input_precision=DOT_PRECISION)
        else:  # A_H[rows, :] @ d: row slices of the whole plane (L2 hits after the first)
            for k in range(0, H, K_SLICE):
                ks = k + tl.arange(0, K_SLICE)
                a_part = tl.load(a_h_ptr + rows[:, None] * H_PAD + ks[None, :])
                d_part = _load_difference(pred_plane, target_plane, ks[:, None] * W + cols[None, :],
                                          (ks[:, None] < H) & (cols[None, :] < W), "")
                mixed = tl.dot(a_part, d_part, mixed, input_precision=DOT_PRECISION)
        weighted = d + half_alpha_s * mixed
        tl.store(partial_ptr + item, tl.sum(d * weighted))
        if NEED_GRAD:
            tl.store(grad_ptr + base + offsets, grad_scale * weighted, mask=mask)


@triton.jit
def _time_kernel(pred_ptr, target_ptr, grad_ptr, partial_ptr, a_t_ptr, alpha_t, grad_scale,
                 T: tl.constexpr, HW: tl.constexpr, T_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                 COL_BLOCKS: tl.constexpr, K_SLICE: tl.constexpr, RESIDENT_T: tl.constexpr,
                 NEED_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One [T_PAD, BLOCK_S] tile of one slab (flat (b, c)) per program: the T term."""
    item = tl.program_id(0)
    base = tl.cast(item // COL_BLOCKS, tl.int64) * (T * HW)
    times = tl.arange(0, T_PAD)
    cols = (item % COL_BLOCKS) * BLOCK_S + tl.arange(0, BLOCK_S)
    col_ok = cols[None, :] < HW
    tile = base + times[:, None] * HW + cols[None, :]
    tile_ok = (times[:, None] < T) & col_ok
    if RESIDENT_T:  # A_T @ d, d from registers; last use of the inputs
        d = _load_difference(pred_ptr, target_ptr, tile, tile_ok, "evict_first")
        a_t = tl.load(a_t_ptr + times[:, None] * T_PAD + times[None, :])
        mixed = tl.dot(a_t, d, input_precision=DOT_PRECISION)
    else:  # row slices of d, then d itself (L1 hits)
        mixed = tl.zeros((T_PAD, BLOCK_S), dtype=tl.float32)
        for k in range(0, T, K_SLICE):
            ks = k + tl.arange(0, K_SLICE)
            a_part = tl.load(a_t_ptr + times[:, None] * T_PAD + ks[None, :])
            d_part = _load_difference(pred_ptr, target_ptr,
                                      base + ks[:, None] * HW + cols[None, :],
                                      (ks[:, None] < T) & col_ok, "")
            mixed = tl.dot(a_part, d_part, mixed, input_precision=DOT_PRECISION)
        d = _load_difference(pred_ptr, target_ptr, tile, tile_ok, "evict_first")
    tl.store(partial_ptr + item, alpha_t * tl.sum(d * mixed))
    if NEED_GRAD:
        grad = tl.load(grad_ptr + tile, mask=tile_ok, other=0.0, eviction_policy="evict_first")
        tl.store(grad_ptr + tile, grad + (grad_scale * alpha_t) * mixed, mask=tile_ok)


@triton.jit
def _loss_kernel(partial_ptr, loss_ptr, count, numel, BLOCK: tl.constexpr):
    """loss = sum(partials) / numel, summed in float64 in a fixed order (one program)."""
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, count, BLOCK):
        index = start + tl.arange(0, BLOCK)
        total += tl.load(partial_ptr + index, mask=index < count, other=0.0).to(tl.float64)
    tl.store(loss_ptr, (tl.sum(total) / numel).to(tl.float32))


def slabs_fitting_in(budget_bytes: int, pred: torch.Tensor, target: torch.Tensor) -> int:
    """How many [T, H, W] slabs' inputs and float32 gradient fit in `budget_bytes`."""
    per_element = pred.element_size() + target.element_size() + 4
    return max(1, budget_bytes // (per_element * math.prod(pred.shape[2:])))


@functools.lru_cache(maxsize=8)
def _cuda_facts(index: int) -> tuple[int, int]:
    """(multiprocessors, L2 bytes) of a CUDA device."""
    properties = torch.cuda.get_device_properties(index)
    return properties.multi_processor_count, properties.L2_cache_size


def _default_slabs_per_launch(pred: torch.Tensor, target: torch.Tensor) -> int:
    """All slabs on the CPU; on CUDA, balanced groups that fit in half the L2."""
    slabs = pred.shape[0] * pred.shape[1]
    if pred.device.type != "cuda":
        return slabs
    fit = slabs_fitting_in(_cuda_facts(pred.device.index or 0)[1] // 2, pred, target)
    return triton.cdiv(slabs, triton.cdiv(slabs, fit))


def kernel_configs(shape: tuple[int, ...],
                   plane_rows: int | None = None) -> tuple[dict, dict]:
    """Constexpr arguments and launch options of the plane and time kernels for a
    [B, C, T, H, W] shape (NEED_GRAD is added per call). See `freq_loss_triton`."""
    frames, height, width = shape[2:]
    t_pad, h_pad, w_pad = (_padded(n) for n in (frames, height, width))
    max_rows = min(h_pad, _MAX_RESIDENT)
    rows = (min(max_rows, max(_MIN_DOT_DIM, _PLANE_TILE // w_pad)) if plane_rows is None
            else plane_rows)
    if not (_MIN_DOT_DIM <= rows <= max_rows and rows & (rows - 1) == 0):
        raise ValueError(f"plane_rows: expected a power of two in [{_MIN_DOT_DIM}, {max_rows}], "
                         f"got {plane_rows}")
    block_s = max(_MIN_DOT_DIM, _TIME_TILE // t_pad)
    plane = {"H": height, "W": width, "H_PAD": h_pad, "W_PAD": w_pad, "BLOCK_H": rows,
             "ROW_BLOCKS": triton.cdiv(height, rows), "K_SLICE": _K_SLICE,
             "RESIDENT_W": w_pad <= _MAX_RESIDENT, "DOT_PRECISION": DOT_PRECISION,
             "num_warps": 8, "num_stages": 2}  # one program per SM: all its warps
    time = {"T": frames, "HW": height * width, "T_PAD": t_pad, "BLOCK_S": block_s,
            "COL_BLOCKS": triton.cdiv(height * width, block_s), "K_SLICE": _K_SLICE,
            "RESIDENT_T": t_pad <= _MAX_RESIDENT, "DOT_PRECISION": DOT_PRECISION,
            "num_warps": 4}
    return plane, time


def freq_loss_triton(pred: torch.Tensor, target: torch.Tensor, alpha_s: float, alpha_t: float,
                     gamma: float, need_grad: bool, slabs_per_launch: int | None = None, *,
                     plane_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    Non-contiguous inputs are copied to contiguous ones first. Launch-plan knobs, for
    the GPU timing to compare (results are bitwise the same for any value):
    `slabs_per_launch` runs the plane and time kernels over that many [T, H, W] slabs at
    a time (default: all on the CPU; on CUDA, groups fitting in half the L2, so that the
    time kernel's reads hit L2); `plane_rows` is the plane kernel's rows per item, a
    power of two in [16, min(H_PAD, 128)] (default: whole planes when they fit a tile).
    """
    check_freq_loss_inputs(pred, target, alpha_s, alpha_t, gamma)
    plane, time = kernel_configs(pred.shape, plane_rows)
    pred, target = pred.contiguous(), target.contiguous()
    batch, channels, frames, height, width = pred.shape
    slabs, device, numel = batch * channels, pred.device, pred.numel()
    group = (_default_slabs_per_launch(pred, target) if slabs_per_launch is None
             else max(1, slabs_per_launch))
    row_blocks, col_blocks = plane["ROW_BLOCKS"], time["COL_BLOCKS"]
    with_time = alpha_t != 0.0 and (frames > 1 or gamma == 0.0)  # else A_T d is zero
    plane_items = slabs * frames * row_blocks
    partials = torch.empty(plane_items + (slabs * col_blocks if with_time else 0),
                           dtype=torch.float32, device=device)
    grad = torch.empty(pred.shape if need_grad else (0,), dtype=torch.float32, device=device)
    grad_scale = 2.0 / numel
    a_t, a_h, a_w = (axis_operator(n, gamma, device) for n in (frames, height, width))
    programs = _cuda_facts(device.index or 0)[0] if device.type == "cuda" else _CPU_PROGRAMS
    for first in range(0, slabs, group):
        count = min(group, slabs - first)
        pred_part, target_part = (t.view(slabs, -1)[first:first + count] for t in (pred, target))
        grad_part = grad.view(slabs, -1)[first:first + count] if need_grad else grad
        items = count * frames * row_blocks
        _plane_kernel[(min(items, programs),)](
            pred_part, target_part, grad_part, partials[first * frames * row_blocks:], a_h, a_w,
            items, alpha_s / 2, grad_scale, NEED_GRAD=need_grad, **plane)
        if with_time:
            _time_kernel[(count * col_blocks,)](
                pred_part, target_part, grad_part, partials[plane_items + first * col_blocks:],
                a_t, alpha_t, grad_scale, NEED_GRAD=need_grad, **time)
    loss = torch.empty((), dtype=torch.float32, device=device)
    _loss_kernel[(1,)](partials, loss, partials.numel(), numel, BLOCK=_FINAL_BLOCK)
    return loss, grad


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
