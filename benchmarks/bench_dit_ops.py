"""Fused DiT ops against PyTorch eager and torch.compile at the Wan2.1-1.3B shape.

Shape: dim 1536, 12 heads (head_dim 128), 480p latent tokens 21*30*52 = 32760, batch 1,
bf16 activations with fp32 modulation (as Wan). Each case times forward+backward; the
benchmark's extra_info carries the effective bandwidth (bytes that must cross HBM once).
GPU cases skip with the reason on a CPU machine; the FLOP-count check runs anywhere.

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

needs_cuda = pytest.mark.skipif(
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
@needs_cuda
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
@needs_cuda
def test_gated_residual(benchmark, impl):
    x, y = _rand(BATCH, TOKENS, DIM), _rand(BATCH, TOKENS, DIM)
    gate = _rand(BATCH, 1, DIM, dtype=torch.float32)
    fn = _pick(impl, gated_residual, gated_residual_reference)
    # forward: read x, y, write out; backward: read dout, y, write dy (dx is dout).
    moved = 6 * x.numel() * x.element_size()
    _time_fwd_bwd(benchmark, fn, [x, y, gate], torch.randn_like(x), moved)


@pytest.mark.benchmark(group="rms_norm_rope fwd+bwd 1.3B")
@pytest.mark.parametrize("impl", IMPLS)
@needs_cuda
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


# --- DiT training step: model-FLOPs utilisation at the 1.3B shape ----------------------

H100_BF16_DENSE_PEAK = 989e12
MFU_LATENT = (16, 21, 60, 104)  # Wan 480p 81-frame latent (C, T, H, W)
MFU_TEXT_TOKENS = 512  # Wan pads the T5 context to 512 tokens


def dit_forward_flops(cfg, batch: int, latent_thw: tuple[int, int, int], text_tokens: int) -> int:
    """Forward FLOPs of WanDiT counted from its matmuls and attention (2 per multiply-add).

    Counted: patch embedding, text and time MLPs, per block the fused qkv/o projections,
    self-attention (QK^T and PV: 4*L^2*dim), cross-attention q/kv/o and 4*L*L_text*dim,
    the FFN, and the head. Elementwise work (norms, RoPE, modulation, GELU) is left out,
    as model-FLOPs utilisation conventionally does.
    """
    pt, ph, pw = cfg.patch_size
    frames, height, width = latent_thw
    tokens = (frames // pt) * (height // ph) * (width // pw)
    patch = pt * ph * pw
    dim, ffn, n = cfg.dim, cfg.ffn_dim, batch * tokens
    text = batch * text_tokens
    per_block = (
        2 * n * dim * 3 * dim + 2 * n * dim * dim  # self-attn qkv + o
        + 4 * batch * tokens * tokens * dim  # QK^T + PV
        + 2 * n * dim * dim * 2 + 2 * text * dim * 2 * dim  # cross-attn q, o + kv
        + 4 * batch * tokens * text_tokens * dim  # cross QK^T + PV
        + 2 * n * dim * ffn * 2  # FFN up + down
    )
    embeddings = (
        2 * n * cfg.in_channels * patch * dim  # patch embedding
        + 2 * text * (cfg.text_dim * dim + dim * dim)  # text MLP
        + 2 * batch * (cfg.freq_dim * dim + dim * dim + dim * 6 * dim)  # time MLP + projection
        + 2 * n * dim * cfg.out_channels * patch  # head
    )
    return cfg.num_layers * per_block + embeddings


def training_step_flops(forward_flops: int) -> int:
    """fwd + bwd model FLOPs: backward costs two forwards (grads w.r.t. inputs and weights)."""
    return 3 * forward_flops


@pytest.mark.parametrize("patch,latent", [((1, 2, 2), (3, 6, 10)), ((4, 2, 2), (8, 6, 10))])
def test_flop_count_matches_torch_flop_counter(patch, latent):
    """CPU check of dit_forward_flops against torch's FlopCounterMode on a small model."""
    from torch.utils.flop_counter import FlopCounterMode

    from gpd_model.attention import force_attention_backend
    from gpd_model.config import get_preset
    from gpd_model.model import WanDiT

    cfg = get_preset("tiny", num_layers=2, patch_size=patch)
    model = WanDiT(cfg)
    batch, text_tokens = 2, 7
    x = torch.randn(batch, cfg.in_channels, *latent)
    context = torch.randn(batch, text_tokens, cfg.text_dim)
    # The explicit-matmul attention path, so the counter sees the attention FLOPs too.
    with force_attention_backend("math"), FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x, torch.full((batch,), 500.0), context)
    assert counter.get_total_flops() == dit_forward_flops(cfg, batch, latent, text_tokens)


@pytest.mark.benchmark(group="DiT training step 1.3B bf16 (MFU)")
@pytest.mark.parametrize("layers", [30, 12])
@needs_cuda
def test_dit_training_step_mfu(benchmark, layers):
    """fwd + bwd + fused AdamW step, bf16 weights, batch 1, 480p latent, random weights.

    30 layers is the 1.3B model; without activation checkpointing its activations may not
    fit 80 GB, so a 12-layer case (the same per-layer shapes, hence nearly the same MFU)
    is measured too. An out-of-memory case skips with the reason.
    """
    from gpd_model.config import get_preset
    from gpd_model.model import WanDiT

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    cfg = get_preset("wan2.1-t2v-1.3b", num_layers=layers)
    with torch.device("cuda"):
        model = WanDiT(cfg).to(torch.bfloat16)
        x = torch.randn(1, *MFU_LATENT, dtype=torch.bfloat16)
        target = torch.randn_like(x)
        context = torch.randn(1, MFU_TEXT_TOKENS, cfg.text_dim, dtype=torch.bfloat16)
        timestep = torch.tensor([500.0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x, timestep, context).float(), target.float())
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()

    try:
        step()
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{layers} layers do not fit without activation checkpointing: {exc}")
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    flops = training_step_flops(dit_forward_flops(cfg, 1, MFU_LATENT[1:], MFU_TEXT_TOKENS))
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "layers": layers,
        "model_TFLOP_per_step": flops / 1e12,
        "TFLOP/s": flops / seconds / 1e12,
        "MFU_vs_989": flops / seconds / H100_BF16_DENSE_PEAK,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
    })
    print(f"\nDiT 1.3B-shape training step, {layers} layers (bf16, latent {MFU_LATENT}, text "
          f"{MFU_TEXT_TOKENS}): {seconds:.3f} s, {flops / seconds / 1e12:.1f} TFLOP/s, "
          f"MFU {100 * flops / seconds / H100_BF16_DENSE_PEAK:.1f}% of 989 TFLOP/s, peak "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
