"""Cases, byte counts and GPU timing shared by bench_kernels.py and device_check.py.

Every implementation of an op computes the same outputs from the same inputs:
  freq_loss           (loss, d loss / d pred) once: the fused op, the closed-form torch.fft
                      reference (fft, weight, ifft: cheaper than autograd), or that
                      reference under torch.compile.
  cfg_euler_step      guided step with CFG: (x_next, g).
  double_step_target  u* with CFG from g1 (float32) and the second teacher output.
Bytes are the least any implementation must move: each input read once, each output
written once. GPU times come from CUDA-graph replays of many calls that rotate over
enough input sets to overflow L2, so neither launch gaps nor cache hits flatter them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpd_kernels.double_step import cfg_euler_step_triton, double_step_target_triton
from gpd_kernels.freq_loss import freq_loss_triton, slabs_fitting_in
from gpd_kernels.reference import (
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
L2_GROUP_BYTES = 16 * 2**20  # freq loss launch groups sized to stay resident in L2


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


def _freq_inputs(shape, dtype, device, generator):
    return (_randn(shape, dtype, device, generator), _randn(shape, dtype, device, generator),
            *LOSS_PARAMS)


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
        {"triton_l2groups": lambda pred, target, *params: freq_loss_triton(
            pred, target, *params, need_grad=True,
            slabs_per_launch=slabs_fitting_in(L2_GROUP_BYTES, pred, target))},
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


def median_seconds_per_call(replay: Callable[[], None], rounds: int = 20) -> float:
    """Median over `rounds` graph replays, timed with CUDA events, divided per call."""
    replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / CALLS_PER_GRAPH)
    return statistics.median(times)
