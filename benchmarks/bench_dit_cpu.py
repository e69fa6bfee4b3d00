"""CPU forward+backward of the tiny-preset DiT: ours against diffusers with the same weights."""

from __future__ import annotations

import pytest
import torch

from gpd_model import WanDiT, get_preset
from gpd_model.checkpoint import export_state_dict

diffusers = pytest.importorskip("diffusers")

BATCH, FRAMES, SIZE, TEXT_TOKENS = 2, 8, 16, 16


@pytest.fixture(scope="module")
def models():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    ours = WanDiT(cfg)
    reference = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps,
    )
    reference.load_state_dict(export_state_dict(ours, "diffusers"), strict=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, cfg.in_channels, FRAMES, SIZE, SIZE, generator=generator)
    timestep = torch.tensor([900.0, 120.0])
    context = torch.randn(BATCH, TEXT_TOKENS, cfg.text_dim, generator=generator)
    with torch.no_grad():
        want = reference(x, timestep, context).sample
        got = ours(x, timestep, context)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5, "benchmarked models disagree"
    return ours, reference, x, timestep, context


def _train_step(run, params, x, timestep, context) -> None:
    for p in params:
        p.grad = None
    run(x, timestep, context).square().mean().backward()


@pytest.mark.benchmark(group="dit-fwd-bwd-tiny")
def test_ours_forward_backward(benchmark, models) -> None:
    ours, _, x, timestep, context = models
    params = list(ours.parameters())
    benchmark.pedantic(_train_step, args=(ours, params, x, timestep, context),
                       rounds=30, iterations=1, warmup_rounds=2)


@pytest.mark.benchmark(group="dit-fwd-bwd-tiny")
def test_diffusers_forward_backward(benchmark, models) -> None:
    _, reference, x, timestep, context = models
    params = list(reference.parameters())
    benchmark.pedantic(_train_step, args=(lambda *a: reference(*a).sample, params, x, timestep,
                                          context), rounds=30, iterations=1, warmup_rounds=2)
