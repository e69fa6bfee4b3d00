"""Cases, byte counts and GPU timing shared by bench_kernels.py and device_check.py.

Every implementation of an op computes the same outputs from the same inputs:
  freq_loss           (loss, d loss / d pred) once: the fused op, the closed-form torch.fft
                      reference (fft, weight, ifft: cheaper than autograd), or that
                      reference under torch.compile.
  band_amplitude_loss (loss, d loss / d pred) once: the fused op, the closed-form torch.fft
                      reference (fft, band sums, ifft), or that under torch.compile.
  cfg_euler_step      guided step with CFG: (x_next, g).
  double_step_target  u* with CFG from g1 (float32) and the second teacher output.
Bytes are the least any implementation must move: each input read once, each output
written once. GPU times come from CUDA-graph replays of many calls that rotate over
enough input sets to overflow L2, so neither launch gaps nor cache hits flatter them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpd_kernels.band_amplitude_loss import band_amplitude_loss_triton
from gpd_kernels.double_step import cfg_euler_step_triton, double_step_target_triton
from gpd_kernels.freq_loss import freq_loss_triton
from gpd_kernels.reference import (
    band_amplitude_loss_grad_reference,
    cfg_euler_step_reference,
    double_step_target_reference,
    freq_loss_grad_reference,
)

WAN_480P = {f"wan480p-b{b}": (b, 16, 21, 60, 104) for b in (1, 2, 4)}
TINY = {"tiny-b16": (16, 3, 8, 16, 16)}
SHAPES = WAN_480P | TINY
LOSS_PARAMS = (1.0, 1.0, 1.0)  # alpha_s, alpha_t, gamma: every term active
HBM_PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
CALLS_PER_GRAPH = 100
ROTATION_BYTES = 256 * 2**20  # input sets per graph span at least this (> 5x an H100's L2)


def hbm_peak(device_name: str) -> tuple[str, float] | None:
    """(card, bytes/s) of the datasheet HBM peak, or None for a card not listed."""
    for card, peak in HBM_PEAK_BYTES_PER_S.items():
        if card in device_name:
            return card, peak
    return None


@dataclass(frozen=True)
class OpCase:
    """One op: how to draw inputs, the bytes it must move, and its implementations."""

    name: str
    make_inputs: Callable[[tuple[int, ...], torch.dtype, str, torch.Generator], tuple]
    bytes_moved: Callable[[tuple[int, ...], torch.dtype], int]
    triton: Callable
    reference: Callable
    variants: dict[str, Callable] = field(default_factory=dict)  # other Triton launch plans


def _randn(shape, dtype, device, generator):
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def _per_sample(shape, low, high, device, generator):
    values = torch.rand(shape[0], generator=generator, device=device)
    return low + (high - low) * values


def _pair_inputs(shape, dtype, device, generator):
    return _randn(shape, dtype, device, generator), _randn(shape, dtype, device, generator)


def _freq_inputs(shape, dtype, device, generator):
    return (*_pair_inputs(shape, dtype, device, generator), *LOSS_PARAMS)


def _step_inputs(shape, dtype, device, generator):
    x, u_cond, u_uncond = (_randn(shape, dtype, device, generator) for _ in range(3))
    sigma_from = _per_sample(shape, 0.5, 1.0, device, generator)
    return (x, u_cond, u_uncond, _per_sample(shape, 1.0, 7.0, device, generator),
            sigma_from, sigma_from - 0.1)


def _target_inputs(shape, dtype, device, generator):
    g1 = _randn(shape, torch.float32, device, generator)
    u_cond, u_uncond = (_randn(shape, dtype, device, generator) for _ in range(2))
    s_a = _per_sample(shape, 0.5, 1.0, device, generator)
    return (g1, u_cond, u_uncond, _per_sample(shape, 1.0, 7.0, device, generator),
            s_a, s_a - 0.1, s_a - 0.2)


def _size(dtype):
    return torch.empty((), dtype=dtype).element_size()


OPS = {
    "freq_loss": OpCase(
        "freq_loss", _freq_inputs,
        # read pred and target, write the float32 gradient
        lambda shape, dtype: math.prod(shape) * (2 * _size(dtype) + 4),
        lambda *args: freq_loss_triton(*args, need_grad=True),
        freq_loss_grad_reference,
        # The default plan splits the slabs into L2-sized launch groups and keeps whole
        # planes per item; these time one launch for all slabs, and 32-row items.
        {"triton_onelaunch": lambda pred, target, *params: freq_loss_triton(
            pred, target, *params, need_grad=True,
            slabs_per_launch=pred.shape[0] * pred.shape[1]),
         "triton_rows32": lambda pred, target, *params: freq_loss_triton(
            pred, target, *params, need_grad=True, plane_rows=32)},
    ),
    "band_amplitude_loss": OpCase(
        "band_amplitude_loss", _pair_inputs,
        # read pred and target, write the float32 gradient
        lambda shape, dtype: math.prod(shape) * (2 * _size(dtype) + 4),
        lambda pred, target: band_amplitude_loss_triton(pred, target, need_grad=True),
        band_amplitude_loss_grad_reference,
    ),
    "cfg_euler_step": OpCase(
        "cfg_euler_step", _step_inputs,
        # read x, u_cond, u_uncond; write x_next (x's dtype) and g (float32)
        lambda shape, dtype: math.prod(shape) * (4 * _size(dtype) + 4),
        cfg_euler_step_triton, cfg_euler_step_reference,
    ),
    "double_step_target": OpCase(
        "double_step_target", _target_inputs,
        # read g1 (float32), u_cond, u_uncond; write u* (float32)
        lambda shape, dtype: math.prod(shape) * (2 * _size(dtype) + 8),
        double_step_target_triton, double_step_target_reference,
    ),
}
IMPLS = ("triton", "eager", "compile")


# One compiled reference serves every shape and dtype here (4 x 2 per op): above dynamo's
# default limit of 8 recompiles it would silently run eager under the "compile" label.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def implementation(op: OpCase, impl: str) -> Callable:
    if impl in op.variants:
        return op.variants[impl]
    if impl == "triton":
        return op.triton
    if impl == "eager":
        return op.reference
    return torch.compile(op.reference, dynamic=False)


def input_sets(op: OpCase, shape, dtype, device: str, seed: int = 0) -> list[tuple]:
    """Enough independent input sets that one graph's calls overflow the L2 cache."""
    generator = torch.Generator(device=device).manual_seed(seed)
    count = 1
    if device == "cuda":
        count = min(CALLS_PER_GRAPH, max(2, math.ceil(ROTATION_BYTES / op.bytes_moved(shape,
                                                                                   dtype))))
    return [op.make_inputs(shape, dtype, device, generator) for _ in range(count)]


def capture_calls(fn: Callable, sets: list[tuple]) -> Callable[[], None]:
    """Warm fn up on every set, then capture CALLS_PER_GRAPH calls in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile, autotune, operator caches: outside capture
        for args in sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in range(CALLS_PER_GRAPH):
            fn(*sets[call % len(sets)])
    return graph.replay


def median_seconds_per_call(replay: Callable[[], None], rounds: int = 10) -> float:
    """Median over `rounds` graph replays, timed with CUDA events, divided per call."""
    return median_seconds(replay, rounds, warmup=1) / CALLS_PER_GRAPH


# --- fused DiT ops, forward + backward, at the Wan2.1-1.3B shape --------------------------
# dim 1536, 12 heads (head_dim 128), 480p latent tokens 21*30*52 = 32760, batch 1, bf16
# activations with fp32 modulation (as Wan). The fused op, its PyTorch reference (eager)
# and torch.compile of that reference compute the same outputs and gradients.

DIT_DIM, DIT_HEADS, DIT_TOKENS = 1536, 12, 21 * 30 * 52
DIT_IMPLS = ("triton", "eager", "compile")


def dit_case(name: str, device: str, tokens: int = DIT_TOKENS,
             dim: int = DIT_DIM, heads: int = DIT_HEADS) -> tuple[list, tuple, torch.Tensor, int]:
    """(leaf inputs, constant inputs, output gradient, bytes that must cross HBM once) of one
    DiT op; `fn(*leaves, *constants)` is the call."""
    def leaf(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(True)

    x = leaf(1, tokens, dim)
    size = x.numel() * x.element_size()
    if name == "layernorm_modulate":
        # forward: read x, write out; backward: read x, dy, write dx.
        leaves, constants, moved = [x, leaf(1, 1, dim, dtype=torch.float32),
                                    leaf(1, 1, dim, dtype=torch.float32)], (), 5 * size
    elif name == "gated_residual":
        # forward: read x, y, write out; backward: read dout, y, write dy (dx is dout).
        leaves, constants, moved = [x, leaf(1, tokens, dim),
                                    leaf(1, 1, dim, dtype=torch.float32)], (), 6 * size
    elif name == "rms_norm_rope":
        # forward: read x, write out; backward: read x, dy, write dx (tables are small).
        x = leaf(1, tokens, heads, dim // heads)
        angles = torch.rand(tokens, dim // heads // 2, device=device) * 2 * math.pi
        leaves, constants, moved = [x, leaf(dim)], (angles.cos(), angles.sin()), 5 * size
    else:
        raise ValueError(f"DiT op: expected one of layernorm_modulate, gated_residual, "
                         f"rms_norm_rope, got {name!r}")
    return leaves, constants, torch.randn_like(leaves[0]), moved


def dit_implementation(name: str, impl: str) -> Callable:
    from gpd_kernels.dit import DIT_OPS

    fused, reference = DIT_OPS[name]
    return {"triton": fused, "eager": reference}.get(impl) or torch.compile(reference,
                                                                            dynamic=False)


def fwd_bwd(fn: Callable, leaves: list, constants: tuple, grad: torch.Tensor) -> Callable:
    """One forward+backward step of fn on fresh gradients."""
    def step() -> None:
        for t in leaves:
            t.grad = None
        fn(*leaves, *constants).backward(grad)

    return step


def median_seconds(step: Callable[[], None], rounds: int = 10, warmup: int = 3,
                   device: str = "cuda") -> float:
    """Median wall time of `step` over `rounds` calls after `warmup` ones: CUDA-event-timed
    on a GPU, by the host clock elsewhere (dry runs)."""
    for _ in range(warmup):  # compile, autotune, allocator: outside the timing
        step()
    if device != "cuda":
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
