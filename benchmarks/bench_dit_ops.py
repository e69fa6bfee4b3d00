"""Fused DiT ops against PyTorch eager and torch.compile at the Wan2.1-1.3B shape.

Shape: dim 1536, 12 heads (head_dim 128), 480p latent tokens 21*30*52 = 32760, batch 1,
bf16 activations with fp32 modulation (as Wan). Each case times forward+backward; the
benchmark's extra_info carries the effective bandwidth (bytes that must cross HBM once).
GPU only: on a CPU machine every case skips with the reason.

Run: `pytest benchmarks/bench_dit_ops.py` (add `-rs` to see skip reasons).
"""

from __future__ import annotations

import math

import pytest
import torch

from gpd_kernels.adaln import (
    gated_residual,
    gated_residual_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)
from gpd_kernels.rope_norm import rms_norm_rope, rms_norm_rope_reference

DIM, HEADS, TOKENS, BATCH = 1536, 12, 21 * 30 * 52, 1
HEAD_DIM = DIM // HEADS

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU benchmark: needs CUDA (the fused DiT ops are timed only on a lent GPU)",
)

IMPLS = ["fused", "eager", "compile"]


def _pick(impl: str, fused, reference):
    if impl == "fused":
        return fused
    if impl == "eager":
        return reference
    return torch.compile(reference, dynamic=False)


def _time_fwd_bwd(benchmark, fn, inputs, grad, bytes_moved: int) -> None:
    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)

    for _ in range(3):  # compile / autotune / allocator warm-up outside the timing
        step()
    torch.cuda.synchronize()

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = bytes_moved / benchmark.stats.stats.median / 1e9


def _rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_(True)


@pytest.mark.benchmark(group="layernorm_modulate fwd+bwd 1.3B")
@pytest.mark.parametrize("impl", IMPLS)
def test_layernorm_modulate(benchmark, impl):
    x = _rand(BATCH, TOKENS, DIM)
    shift, scale = _rand(BATCH, 1, DIM, dtype=torch.float32), _rand(BATCH, 1, DIM,
                                                                     dtype=torch.float32)
    fn = _pick(impl, layernorm_modulate, layernorm_modulate_reference)
    # forward: read x, write out; backward: read x, dy, write dx.
    moved = 5 * x.numel() * x.element_size()
    _time_fwd_bwd(benchmark, fn, [x, shift, scale], torch.randn_like(x), moved)


@pytest.mark.benchmark(group="gated_residual fwd+bwd 1.3B")
@pytest.mark.parametrize("impl", IMPLS)
def test_gated_residual(benchmark, impl):
    x, y = _rand(BATCH, TOKENS, DIM), _rand(BATCH, TOKENS, DIM)
    gate = _rand(BATCH, 1, DIM, dtype=torch.float32)
    fn = _pick(impl, gated_residual, gated_residual_reference)
    # forward: read x, y, write out; backward: read dout, y, write dy (dx is dout).
    moved = 6 * x.numel() * x.element_size()
    _time_fwd_bwd(benchmark, fn, [x, y, gate], torch.randn_like(x), moved)


@pytest.mark.benchmark(group="rms_norm_rope fwd+bwd 1.3B")
@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_rope(benchmark, impl):
    x = _rand(BATCH, TOKENS, HEADS, HEAD_DIM)
    weight = _rand(DIM)
    angles = torch.rand(TOKENS, HEAD_DIM // 2, device="cuda") * 2 * math.pi
    cos, sin = angles.cos(), angles.sin()
    fn = _pick(impl, rms_norm_rope, rms_norm_rope_reference)

    def call(x_in, w_in):
        return fn(x_in, w_in, cos, sin)

    # forward: read x, write out; backward: read x, dy, write dx (tables are small).
    moved = 5 * x.numel() * x.element_size()
    _time_fwd_bwd(benchmark, call, [x, weight], torch.randn_like(x), moved)
