"""Fused DiT ops against PyTorch eager and torch.compile at the Wan2.1-1.3B shape.

Cases (shape, bytes, implementations) are kernel_cases.dit_case, shared with
device_check.py: dim 1536, 12 heads, 32760 tokens (480p), batch 1, bf16 activations with
fp32 modulation. Each case times forward+backward; the benchmark's extra_info carries the
effective bandwidth (bytes that must cross HBM once).
GPU cases skip with the reason on a CPU machine; the FLOP-count check runs anywhere.

Run: `pytest benchmarks/bench_dit_ops.py` (add `-rs` to see skip reasons).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DIT_IMPLS, dit_case, dit_implementation, fwd_bwd

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU benchmark: needs CUDA (the fused DiT ops are timed only on a lent GPU)",
)


@pytest.mark.parametrize("impl", DIT_IMPLS)
@pytest.mark.parametrize("op", ["layernorm_modulate", "gated_residual", "rms_norm_rope"])
@needs_cuda
def test_dit_op_fwd_bwd(benchmark, op, impl):
    """Each fused DiT op against its eager and torch.compile'd reference, side by side."""
    benchmark.group = f"{op} fwd+bwd 1.3B"
    leaves, constants, grad, moved = dit_case(op, "cuda")
    step = fwd_bwd(dit_implementation(op, impl), leaves, constants, grad)
    for _ in range(3):  # compile / autotune / allocator warm-up outside the timing
        step()
    torch.cuda.synchronize()

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = moved / benchmark.stats.stats.median / 1e9


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
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
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
