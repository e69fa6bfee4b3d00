"""6-step guidance-free student sampling: eager Euler vs the CUDA-graph sampler.

Sizes: `tiny` (16x16 RGB latents of 8 frames, 3x8x16x16, batch 4, fp32; launch-bound,
the design asks graph >= 1.3x eager here) and `1.3b` (Wan2.1-T2V-1.3B, random weights,
bf16, 480p latent 16x21x60x104, 512 text tokens, batch 1; compute-bound, graph must not
be slower). Both modes of a size share one model and inputs, so the pytest-benchmark
group table shows them side by side. GPU cases skip with the reason on a CPU machine;
the eager tiny case also runs on the CPU.

Run: `pytest benchmarks/bench_sampler.py -rs`.
"""

from __future__ import annotations

import pytest
import torch

from gpd_model import Conditioning, DiTDenoiser, WanDiT, get_preset, sigma_grid
from gpd_model.graph_sampler import GraphSampler

STEPS = 6
SIZES = {
    # name: (preset, latent [B, C, T, H, W], text tokens, dtype, shift, rounds)
    "tiny": ("tiny", (4, 3, 8, 16, 16), 4, torch.float32, 3.0, 20),
    "1.3b": ("wan2.1-t2v-1.3b", (1, 16, 21, 60, 104), 512, torch.bfloat16, 5.0, 3),
}
CASES = [("tiny", "eager", "cpu"), ("tiny", "eager", "cuda"), ("tiny", "graph", "cuda"),
         ("1.3b", "eager", "cuda"), ("1.3b", "graph", "cuda")]

_models: dict[tuple[str, str], tuple[WanDiT, torch.Tensor, torch.Tensor]] = {}


def _setup(size: str, device: str):
    """Model (random weights, built on the device) and inputs, shared by both modes."""
    key = (size, device)
    if key not in _models:
        _models.clear()  # keep one model in memory at a time (the 1.3B one is ~2.6 GB)
        preset, latent, text_tokens, dtype, _, _ = SIZES[size]
        torch.manual_seed(0)
        with torch.device(device):
            model = WanDiT(get_preset(preset)).to(dtype).eval()
            noise = torch.randn(latent, dtype=dtype)
            cond = Conditioning(torch.randn(latent[0], text_tokens, model.cfg.text_dim,
                                            dtype=dtype))
        _models[key] = (DiTDenoiser(model), noise, cond)
    return _models[key]


@pytest.mark.parametrize("size,mode,device", CASES, ids=["-".join(c) for c in CASES])
def test_sampler(benchmark, size, mode, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU benchmark: needs CUDA (eager vs CUDA-graph timings only on a lent GPU)")
    benchmark.group = f"6-step sampler {size} ({device})"
    denoiser, noise, cond = _setup(size, device)
    shift = SIZES[size][4]
    rounds = 3 if device == "cpu" else SIZES[size][5]  # the CPU case is a smoke test
    sampler = GraphSampler(denoiser, sigma_grid(STEPS, shift), use_graphs=(mode == "graph"))

    def run():
        out = sampler(noise, cond)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # capture (graph mode) and warm-up outside the timing
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"steps": STEPS, "captures": sampler.captures_made,
                                 "latent": list(noise.shape), "dtype": str(noise.dtype)})
    if mode == "graph":
        eager = GraphSampler(denoiser, sigma_grid(STEPS, shift), use_graphs=False)
        tol = 1e-4 if noise.dtype == torch.float32 else 3e-2
        torch.testing.assert_close(run().float(), eager(noise, cond).float(),
                                   atol=tol, rtol=tol)
